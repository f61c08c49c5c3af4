"""Fused 4-bit dequantize-and-multiply for a few rows of activations (decode, small batches).

``out[m, n] = sum_k A[m, k] * W[n, k]`` where W [N, K] is stored as packed 4-bit codes (two per
byte, first element high nibble, row-major over the flattened weight) with one float32 absmax per
``blocksize`` consecutive elements. At small M the product is bound by reading the weight: 0.5
byte per element plus 4 bytes per block of absmax, a quarter of bf16's bytes. Each program
decodes a [BLOCK_N, BLOCK_K] tile in registers and never writes the dense weight; K is split
across programs (``SPLIT_K``) when N alone gives too few programs to fill the GPU, the partial
sums meeting through float32 atomic adds.

The weight tile is decoded as the reference does (code value times absmax in float32, rounded to
the compute dtype), then multiplied with float32 accumulation: results match dequantize-then-
matmul within the compute dtype's rounding of the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..._ops import REFERENCES
from . import cast_rtne, interpreting

# Rows handled by the fused kernel (float32 inputs: one row); larger batches dequantize once and
# use cuBLAS.
MAX_FUSED_ROWS = 16


@triton.jit
def _gemv_4bit_kernel(
    a_ptr,
    b_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_pair = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    row_start = offs_n.to(tl.int64) * K  # flat index of W[n, 0]
    mask_n = offs_n < N

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # Element (n, k) sits at flat index n*K + k; its byte is that index // 2. K is even, so
        # the pair (k, k+1) with k even shares one byte: high nibble k, low nibble k+1.
        k_even = k0 + 2 * offs_pair
        flat = row_start[:, None] + k_even[None, :]
        mask = mask_n[:, None] & (k_even[None, :] < k_end)
        packed = tl.load(b_ptr + flat // 2, mask=mask, other=0)
        scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)
        w_high = tl.load(code_ptr + (packed >> 4)) * scale
        w_low = tl.load(code_ptr + (packed & 0xF)) * scale
        w = cast_rtne(tl.interleave(w_high, w_low), a_ptr.dtype.element_ty, INTERPRET)  # [BLOCK_N, BLOCK_K]

        k_idx = k0 + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + k_idx[None, :],
            mask=(offs_m[:, None] < M) & (k_idx[None, :] < k_end),
            other=0.0,
        )
        if USE_DOT and INTERPRET:
            # The interpreter's dot mishandles bfloat16; the values are exact in float32.
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif USE_DOT:
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32)
        else:
            # One row: a broadcast multiply and a row sum beat padding M to 16 for tensor cores.
            acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def _split_k(n_programs: int, K: int, block_k: int, device: torch.device) -> int:
    """Enough K-splits to give every multiprocessor about two programs, keeping chunks >= 8 tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    split = 1
    while n_programs * split < 2 * sms and K // (split * 2) >= 8 * block_k:
        split *= 2
    return split


def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::gemv_4bit``: A [..., K] times 4-bit W [N, K] transposed -> [..., N]."""
    N, K = int(shapeB[0]), int(shapeB[1])
    rows = A.numel() // K if K else 0
    fused = rows == 1 or (rows <= MAX_FUSED_ROWS and A.dtype != torch.float32)
    if not fused or K % 2 or blocksize % 2 or N == 0:
        return REFERENCES["gemv_4bit"](A, B, shapeB, absmax, code, blocksize)
    a2d = A.reshape(rows, K).contiguous()
    packed = B.contiguous().view(torch.uint8).reshape(-1)
    code = code.to(device=A.device, dtype=torch.float32).contiguous()
    absmax = absmax.to(torch.float32).contiguous()

    block_m = 1 if rows == 1 else 16
    block_n = 32 if rows == 1 else 64
    block_k = 256 if rows == 1 else 128
    n_programs = triton.cdiv(N, block_n)
    split_k = _split_k(n_programs, K, block_k, A.device)
    if split_k == 1:
        out = torch.empty(rows, N, device=A.device, dtype=A.dtype)
    else:
        out = torch.zeros(rows, N, device=A.device, dtype=torch.float32)
    _gemv_4bit_kernel[(n_programs, split_k)](
        a2d,
        packed,
        absmax,
        code,
        out,
        rows,
        N,
        K,
        a2d.stride(0),
        out.stride(0),
        BLOCKSIZE=blocksize,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        USE_DOT=block_m > 1,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return out.to(A.dtype).reshape(*A.shape[:-1], N)
