"""Fused 4-bit dequantize-and-multiply for a few rows of activations (decode, small batches).

``out[m, n] = sum_k A[m, k] * W[n, k]`` where W [N, K] is stored as packed 4-bit codes (two per
byte, first element high nibble, row-major over the flattened weight) with one absmax per
``blocksize`` consecutive elements: float32, or 8-bit codes of a nested state (decoded here, in
the same kernel, as ``absmax_code[q] * absmax_scale[block // absmax_blocksize] + offset``). At
small M the product is bound by reading the weight, 0.5 byte per element plus the absmax: a
quarter of bf16's bytes. The dense weight is never written.

Each program owns BLOCK_N rows of W and walks K in tiles of BLOCK_N x BLOCK_K codes, read as
32-bit words of 8 codes (16-byte loads), the next tile requested before the current one is
decoded; K is split across SPLIT_K programs (partial sums meeting through float32 atomic adds)
when N alone gives too few programs. Code j of a word (k = 8 w + j) is multiplied with A's
column 8 w + j, so the codes are never interleaved back into k order. Code values come from a
register gather on the 16-entry table (staged in shared memory by Triton). Two variants:

- CUDA cores (``USE_DOT=False``, one program per row of A): one fused multiply-add per code
  with the float32 code value; each block's partial sum is multiplied by its absmax once. W is
  not rounded to the compute dtype: the result is at least as accurate as dequantize-then-
  matmul, and within the compute dtype's rounding of it.
- Tensor cores (``USE_DOT=True``, up to 16 rows, fp16/bf16): each code column is decoded to the
  compute dtype exactly as the reference decodes (code * absmax in float32, then rounded) and
  multiplied with ``tl.dot`` against A's matching columns ("swap AB": W's rows fill the MMA's M).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._ops import REFERENCES
from . import cast_rtne, interpreting
from .quant_4bit import decode_4bit

# Launch configurations by row count: the first entry whose row limit covers the rows is used.
# (max rows, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_dot). More rows than the last
# entry (or float32 inputs past the CUDA-core entries) decode W and use cuBLAS. Picked by
# tests/gpu/tune_gemv_4bit.py on an H100 (2026-11-24): one row 1.2-1.5x bf16 F.linear (43% of
# copy bandwidth at 8192x28672); two rows 0.6-0.8x; 3..16 rows on tensor cores ~0.5x bf16,
# level with dequantize + cuBLAS but without writing the dense weight.
CONFIGS: list[tuple[int, int, int, int, int, int, bool]] = [
    (2, 1, 8, 2048, 4, 1, False),
    (16, 16, 128, 256, 4, 1, True),
]


@triton.jit
def _gemv_4bit_kernel(
    a_ptr,
    w_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    offset_ptr,
    code_ptr,
    out_ptr,
    M,
    N,
    K,
    row_stride_words,
    row_stride_blocks,
    stride_am,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX_BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # W is read as 32-bit words, 8 codes each (k = 8 w + j, little-endian bytes, high nibble
    # first). The launcher guarantees K % BLOCK_K == 0, so only rows are masked and the word
    # loads are 16 bytes wide. Row n's words start at n * K / 8 and its blocks at
    # n * K / BLOCKSIZE (passed as strides, so that Triton sees their divisibility).
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_words = offs_n.to(tl.int64) * row_stride_words
    row_blocks = offs_n.to(tl.int64) * row_stride_blocks
    offs_w = tl.arange(0, WORDS)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M

    tiles = K // (SPLIT_K * BLOCK_K)  # per split; the launcher makes this exact
    k_begin = pid_k * tiles * BLOCK_K  # written so that Triton sees it is a multiple of BLOCK_K
    table = tl.load(code_ptr + tl.arange(0, 16))
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T tile: W @ A^T
    else:
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # one row of A: summed over words at the end
        a_row = a_ptr + row0.to(tl.int64) * stride_am
    # Software pipelining by hand: the next tile's words and absmax are requested before the
    # current tile is decoded, so that a program always has a tile in flight (the loop is
    # otherwise latency bound: a tile's decode waits on its own loads).
    w_rows = w_ptr + row_words[:, None]
    words_next = tl.load(w_rows + (k_begin // 8 + offs_w)[None, :], mask=mask_n[:, None], other=0)
    absmax_next = tl.load(
        absmax_ptr + row_blocks[:, None] + ((k_begin + 8 * offs_w) // BLOCKSIZE)[None, :], mask=mask_n[:, None], other=0
    )
    for tile in tl.range(0, tiles, num_stages=NUM_STAGES):
        k0 = k_begin + tile * BLOCK_K
        word_k = k0 + 8 * offs_w  # first k of each word [WORDS]
        words = words_next
        absmax = absmax_next
        more = offs_n[:, None] < tl.where(tile + 1 < tiles, N, 0)  # rows to prefetch: none after the last tile
        words_next = tl.load(w_rows + ((k0 + BLOCK_K) // 8 + offs_w)[None, :], mask=more, other=0)
        absmax_next = tl.load(
            absmax_ptr + row_blocks[:, None] + ((word_k + BLOCK_K) // BLOCKSIZE)[None, :], mask=more, other=0
        )
        if NESTED:
            block_index = row_blocks[:, None] + (word_k // BLOCKSIZE)[None, :]  # [BLOCK_N, WORDS]
            outer = tl.load(absmax_scale_ptr + block_index // ABSMAX_BLOCKSIZE, mask=mask_n[:, None], other=0.0)
            scale = tl.load(absmax_code_ptr + absmax.to(tl.int32)) * outer + tl.load(offset_ptr)
        else:
            scale = absmax
        if not USE_DOT:
            part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for j in tl.static_range(8):
            # Nibble j is in byte j // 2 of the word, high nibble (even j) first. The lookup is a
            # register gather from the 16-entry table (Triton stages it in shared memory): a
            # global-memory gather per element, even from L1, limited the kernel to ~30% of the
            # copy bandwidth on an H100.
            nibble = (words >> (8 * (j // 2) + 4 * (1 - j % 2))) & 15
            value = tl.reshape(tl.gather(table, tl.reshape(nibble, [BLOCK_N * WORDS]), 0), [BLOCK_N, WORDS])
            if USE_DOT:
                w_j = cast_rtne(value * scale, a_ptr.dtype.element_ty, INTERPRET)  # as the reference decodes
                a_t = tl.load(
                    a_ptr + offs_m[None, :].to(tl.int64) * stride_am + (word_k + j)[:, None],
                    mask=mask_m[None, :],
                    other=0.0,
                )  # [WORDS, BLOCK_M]
                if INTERPRET:
                    # The interpreter's dot mishandles bfloat16; the values are exact in float32.
                    acc += tl.dot(w_j.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                else:
                    acc = tl.dot(w_j, a_t, acc, out_dtype=tl.float32)
            else:
                part += value * tl.load(a_row + word_k + j).to(tl.float32)[None, :]
        if not USE_DOT:
            acc += part * scale

    if USE_DOT:
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        result = tl.sum(acc, axis=1)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, result, mask=out_mask)


@lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split_k(n_programs: int, K: int, block_k: int, device: torch.device) -> int:
    """K-splits so that every multiprocessor gets a program; each split a whole number of >= 4 tiles."""
    target = _multiprocessors(device)
    split = 1
    while n_programs * split < target and K % (split * 2 * block_k) == 0 and K // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def _config(rows: int, K: int, dtype: torch.dtype) -> Optional[tuple[int, int, int, int, int, bool]]:
    """The launch configuration for ``rows`` rows, with BLOCK_K reduced to divide K; None: not fused."""
    for max_rows, block_m, block_n, block_k, warps, stages, use_dot in CONFIGS:
        if rows > max_rows or (use_dot and dtype == torch.float32):
            continue
        while block_k > 8 and K % block_k:
            block_k //= 2
        if K % block_k or (use_dot and block_k < 128):  # a dot needs >= 16 words per tile
            return None
        return block_m, block_n, block_k, warps, stages, use_dot
    return None


def _as_words(B: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed codes as a 1-D int32 tensor (a view when B is contiguous), None if misaligned."""
    flat = B.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() % 4 or flat.data_ptr() % 16:
        return None
    return flat.view(torch.int32)


def _launch(A, words, N: int, K: int, absmax, nested_args, code, blocksize: int, config) -> torch.Tensor:
    block_m, block_n, block_k, warps, stages, use_dot = config
    rows = A.numel() // K
    a2d = A.reshape(rows, K)
    if a2d.stride(1) != 1:
        a2d = a2d.contiguous()
    if code.dtype != torch.float32 or not code.is_contiguous():
        code = code.float().contiguous()
    if not use_dot:
        block_m = 1  # the CUDA-core kernel reads one row of A per program
    n_programs = triton.cdiv(N, block_n)
    m_programs = triton.cdiv(rows, block_m)
    split_k = _split_k(n_programs * m_programs, K, block_k, A.device)
    if split_k == 1:
        out = torch.empty(rows, N, device=A.device, dtype=A.dtype)
    else:
        out = torch.zeros(rows, N, device=A.device, dtype=torch.float32)
    if nested_args is None:
        absmax_code, absmax_scale, offset, absmax_blocksize = absmax, absmax, absmax, 1
    else:
        absmax_code, absmax_scale, offset, absmax_blocksize = nested_args
    _gemv_4bit_kernel[(n_programs, split_k, m_programs)](
        a2d,
        words,
        absmax,
        absmax_code,
        absmax_scale,
        offset,
        code,
        out,
        rows,
        N,
        K,
        K // 8,
        K // blocksize,
        a2d.stride(0),
        out.stride(0),
        BLOCKSIZE=blocksize,
        NESTED=nested_args is not None,
        ABSMAX_BLOCKSIZE=absmax_blocksize,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        USE_DOT=use_dot,
        NUM_STAGES=stages,
        INTERPRET=interpreting(),
        num_warps=warps,
    )
    if split_k != 1:
        out = out.to(A.dtype)
    return out.reshape(*A.shape[:-1], N)


def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::gemv_4bit``: A [..., K] times 4-bit W [N, K] transposed -> [..., N].

    Up to 16 rows run the fused kernel (configuration by row count, ``CONFIGS``); more rows, or
    shapes the kernel does not take, decode W with the Triton dequantize kernel and use cuBLAS.
    """
    N, K = int(shapeB[0]), int(shapeB[1])
    rows = A.numel() // K if K else 0
    if N == 0 or K == 0 or rows == 0:
        return REFERENCES["gemv_4bit"](A, B, shapeB, absmax, code, blocksize)
    config = None if K % blocksize else _config(rows, K, A.dtype)
    words = None if config is None else _as_words(B)
    if words is None:
        table = code.to(device=A.device, dtype=torch.float32).contiguous()
        weight = decode_4bit(B, absmax, table, blocksize, [N, K], A.dtype)
        return torch.nn.functional.linear(A, weight)
    if absmax.dtype != torch.float32 or not absmax.is_contiguous():
        absmax = absmax.float().contiguous()
    return _launch(A, words, N, K, absmax, None, code, blocksize, config)


def gemv_4bit_nested(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    offset: torch.Tensor,
    absmax_blocksize: int,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::gemv_4bit_nested``: :func:`gemv_4bit` with 8-bit absmax codes."""
    N, K = int(shapeB[0]), int(shapeB[1])
    rows = A.numel() // K if K else 0
    config = None if N == 0 or rows == 0 or K % blocksize or absmax.dtype != torch.uint8 else _config(rows, K, A.dtype)
    words = None if config is None else _as_words(B)
    if words is None:
        return REFERENCES["gemv_4bit_nested"](
            A, B, shapeB, absmax, absmax_code, absmax_scale, offset, absmax_blocksize, code, blocksize
        )
    nested = (
        absmax_code.float().contiguous(),
        absmax_scale.float().contiguous(),
        offset.float().reshape(1),
        absmax_blocksize,
    )
    return _launch(A, words, N, K, absmax.contiguous(), nested, code, blocksize, config)
