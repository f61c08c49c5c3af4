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
from .quant_4bit import decode_4bit

# (BLOCK_N, BLOCK_K, num_warps) for one row and for 2..16 rows.
CONFIGS = {"row": (16, 256, 4), "rows": (32, 64, 4)}
# Rows handled by the fused kernel. Measured on an H100 (2026-11-24) the one-row kernel beats
# dequantize + cuBLAS, while the tensor-core variant for 2..16 rows does not yet (it is latency
# bound: too few bytes in flight per multiprocessor), so only one row is fused for now; more rows
# decode the weight with the Triton dequantize kernel and use cuBLAS.
MAX_FUSED_ROWS = 1


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
    # The tile's K range splits into GROUPS runs of GROUP elements that share one absmax (one
    # quantization block, or the whole tile when a block is wider than the tile). K is a multiple
    # of BLOCKSIZE, so a row's blocks start at n * K / BLOCKSIZE.
    GROUP: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_bytes = offs_n.to(tl.int64) * (K // 2)
    row_blocks = offs_n.to(tl.int64) * (K // BLOCKSIZE)
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, GROUPS)
    offs_pair = tl.arange(0, GROUP // 2)
    offs_k = tl.arange(0, BLOCK_K)

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T tile: W @ A^T
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one row: summed over K at the end
    for k0 in range(k_begin, k_end, BLOCK_K):
        group_k = k0 + offs_g * GROUP  # first k of each group, [GROUPS]
        # Byte offsets written as (group start) / 2 + pair: the compiler sees them contiguous and
        # issues wide loads (an expression like (k0 + 2 * i) // 2 would hide that).
        byte_k = (group_k // 2)[:, None] + offs_pair[None, :]  # [GROUPS, GROUP/2]
        mask = mask_n[:, None, None] & ((2 * byte_k)[None, :, :] < k_end)
        packed = tl.load(b_ptr + row_bytes[:, None, None] + byte_k[None, :, :], mask=mask, other=0).to(tl.int32)
        scale = tl.load(
            absmax_ptr + row_blocks[:, None] + (group_k // BLOCKSIZE)[None, :],
            mask=mask_n[:, None] & (group_k[None, :] < k_end),
            other=0.0,
        )[:, :, None]
        w_high = tl.load(code_ptr + (packed >> 4)) * scale
        w_low = tl.load(code_ptr + (packed & 0xF)) * scale
        # (high, low) pairs are consecutive k: interleave them back into a [BLOCK_N, BLOCK_K] tile
        w = tl.reshape(tl.join(w_high, w_low), [BLOCK_N, BLOCK_K])
        w = cast_rtne(w, a_ptr.dtype.element_ty, INTERPRET)

        k_idx = k0 + offs_k
        if USE_DOT:
            a_t = tl.load(
                a_ptr + offs_m[None, :] * stride_am + k_idx[:, None],
                mask=(offs_m[None, :] < M) & (k_idx[:, None] < k_end),
                other=0.0,
            )  # [BLOCK_K, BLOCK_M]
            if INTERPRET:
                # The interpreter's dot mishandles bfloat16; the values are exact in float32.
                acc += tl.dot(w.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w, a_t, out_dtype=tl.float32)
        else:
            a = tl.load(a_ptr + k_idx, mask=k_idx < k_end, other=0.0)
            acc += w.to(tl.float32) * a.to(tl.float32)[None, :]

    if USE_DOT:
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        result = tl.sum(acc, axis=1)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, result, mask=out_mask)


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
    if N == 0 or K == 0:
        return REFERENCES["gemv_4bit"](A, B, shapeB, absmax, code, blocksize)
    if not fused or K % blocksize:
        table = code.to(device=A.device, dtype=torch.float32).contiguous()
        weight = decode_4bit(B, absmax, table, blocksize, [N, K], A.dtype)
        return torch.nn.functional.linear(A, weight)
    a2d = A.reshape(rows, K).contiguous()
    packed = B.contiguous().view(torch.uint8).reshape(-1)
    code = code.to(device=A.device, dtype=torch.float32).contiguous()
    absmax = absmax.to(torch.float32).contiguous()

    block_m = 1 if rows == 1 else 16
    block_n, block_k, warps = CONFIGS["row" if rows == 1 else "rows"]
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
        num_warps=warps,
    )
    return out.to(A.dtype).reshape(*A.shape[:-1], N)
