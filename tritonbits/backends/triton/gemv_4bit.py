"""Fused 4-bit dequantize-and-multiply for a few rows of activations (decode, small batches).

``out[m, n] = sum_k A[m, k] * W[n, k]`` where W [N, K] is stored as packed 4-bit codes (two per
byte, first element high nibble, row-major over the flattened weight) with one absmax per
``blocksize`` consecutive elements: float32, or 8-bit codes of a nested state (decoded here, in
the same kernel, as ``absmax_code[q] * absmax_scale[block // absmax_blocksize] + offset``). At
small M the product is bound by reading the weight, 0.5 byte per element plus the absmax: a
quarter of bf16's bytes. The dense weight is never written.

Each program owns BLOCK_N rows of W and walks K in tiles of BLOCK_N x BLOCK_K codes, read as
32-bit words of 8 codes (16-byte loads), the next tile requested before the current one is
decoded; K is split across SPLIT_K programs when N alone gives too few programs: their partial
sums meet through float32 atomic adds into a zeroed output (converted after: three launches), or,
with the tensor cores' ``reduce_last`` option (off in CONFIGS until timed on a GPU), in the one
launch: the last split to arrive sums the others' partial tiles in split order. With A permuted
to [rows, 8, K / 8], code j of a word (k = 8 w + j) meets a contiguous run of A, so the codes are
never interleaved back into k order; otherwise a tile's codes are decoded at once in k order. Code values come from a
register gather on the 16-entry table (staged in shared memory by Triton). Three variants:

- CUDA cores (``USE_DOT=False``, 1, 2 or 4 rows of A per program, each decoded code serving
  all of them): one fused multiply-add per code and row with the float32 code value; each
  word's partial sum is multiplied by its absmax once. W is
  not rounded to the compute dtype: the result is at least as accurate as dequantize-then-
  matmul, and within the compute dtype's rounding of it. In ``_gemv_4bit_kernel`` W's rows are
  spread over threads; in ``_gemv_4bit_rows_kernel`` (the one-row entry) every thread holds the
  same words of 2 or 4 rows of W, so that each value of A it loads serves that many codes. There
  ``byte_pairs`` (a configuration option, off in CONFIGS until timed on a GPU) looks up both
  codes of a byte at once in a 256-entry table of float32 pairs built in the kernel: the same
  values and sums bit for bit, 16-35% fewer instructions a code by an offline sm_90 compile
  (``tests/gpu/sass_gemv_4bit.py``). But the 2 KB table is read with bank conflicts: random
  bytes cost a warp about 5.8 shared-memory wavefronts per lookup (a simulation of 16-lane
  half-warps over 16 bank pairs), against 1 for each of the two conflict-free lookups of the
  16-entry table, so it may trade the issue limit for a shared-memory one.
- Tensor cores (``USE_DOT=True``, up to 16 rows, fp16/bf16), "swap AB" (W's rows fill the
  MMA's M). In k order (``PERMUTED_A=False``, the default entry): a tile is one absmax block
  wide, its codes are decoded at once to the table's values in the compute dtype, multiplied
  with A as stored by one ``tl.dot``, and the float32 result is scaled by each row's absmax.
  With A permuted: each code column is decoded exactly as the reference decodes (code *
  absmax in float32, then rounded) and multiplied with A's matching columns.
  Either way the result is within the compute dtype's rounding of dequantize-then-matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._ops import REFERENCES
from ...quant_state import QuantState
from . import cast_rtne, half_of_word, interpreting
from .kept_launch import KeptLaunch, kept_launch
from .quant_4bit import decode_4bit, nested_absmax_args, nested_args

# Launch configurations by row count: the first entry whose row limit covers the rows is used.
# (max rows, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_dot, permute_a[,
# programs_per_sm[, prefetch[, rows_in_thread[, byte_pairs[, reduce_last]]]]]). BLOCK_M rows of A per program
# (CUDA cores: 1, 2 or 4 rows sharing each decoded code). permute_a: A is copied to [rows, 8, K / 8] first
# (float32 for the CUDA-core kernels), so that code j of a tile's words meets a contiguous run of
# A; otherwise A is read as stored and a tile is decoded in k order (tensor cores: BLOCK_K is
# capped at the blocksize, so that each row of the tile has one absmax, applied to the dot's
# result). programs_per_sm: K is split until the grid has that many programs per
# multiprocessor. prefetch: tiles of W in flight per program (1 or 2). rows_in_thread: every
# thread holds the same run of K for BLOCK_N rows of W (``_gemv_4bit_rows_kernel``); byte_pairs:
# there, one lookup per byte of a 256-entry table of code pairs instead of one per code;
# reduce_last (tensor cores): the K-splits' partial tiles summed by the last split to arrive, in
# the one launch, instead of atomic adds into a zeroed float32 output converted after (two more
# launches). More rows
# than the last entry (or float32 inputs past the CUDA-core entries) decode W and use cuBLAS.
# Picked by tests/gpu/tune_gemv_4bit.py (NF4, blocksize 64, float32 absmax, bf16, kernel times
# through CUDA graphs, A's permute included); on an H200 (2026-12-03,
# benchmarks/results/20261203-h200-session9/) against bf16 F.linear: one row with W's rows in
# each thread 1.73x at 8192x28672 (70.0 us; W's rows over threads: 91.0 us, where Nsight Compute
# found L1 84% busy with the rows' reloads of A) and 1.04x at 4096x4096 (9.9 us); 16 rows in
# k order on tensor cores 0.93x at 8192x28672 (130.8 us; bitsandbytes 371 us) and 0.67x at
# 4096x4096 (14.8 us), where bf16's weight is read from L2. Two tiles in flight did not help
# (94.2 against 91.0 us), nor did 4 rows of A with W's rows in each thread (135.5 us, against
# 126.7 us on tensor cores). The k-order tensor-core entry replaced one dot per code column of
# A permuted, which ran 0.41x bf16 at 5-16 rows on an H100 (2026-11-24).
# On an H200 (2026-12-03; that run's logs were lost, the figures are from its notes) one row of
# 16-bit A read as stored (32-bit pairs, no permute launch) took 8.0 us at 4096x4096 against
# 9.9 us permuted, but 72.9 against 67.8 us at 8192x28672: a thread's pairs of A are 16 bytes
# apart, four times the L1 wavefronts of the permuted runs, against the permute's fixed ~2.5 us.
# So it takes weights up to PAIRS_MAX_WEIGHT elements (kernel times through the layer:
# benchmarks/results/20261204-h200-session11/call1/launch_overhead.txt).
PAIRS_MAX_WEIGHT = 1 << 26
CONFIGS: list[tuple] = [
    (1, 1, 4, 1024, 4, 1, False, False, 1, 1, True),  # 16-bit A, weights up to PAIRS_MAX_WEIGHT elements
    (1, 1, 4, 2048, 2, 1, False, True, 1, 1, True),
    (16, 16, 64, 64, 4, 3, True, False, 4),
    (4, 4, 4, 2048, 4, 1, False, True, 1),  # float32 A (no tensor-core entry takes it)
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
    bias_ptr,
    out_ptr,
    partial_ptr,
    count_ptr,
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
    PERMUTED_A: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    REDUCE_LAST: tl.constexpr = False,
):
    # W is read as 32-bit words, 8 codes each (k = 8 w + j, little-endian bytes, high nibble
    # first). The launcher guarantees K % BLOCK_K == 0, so only rows are masked and the word
    # loads are 16 bytes wide. Row n's words start at n * K / 8 and its blocks at
    # n * K / BLOCKSIZE (passed as strides, so that Triton sees their divisibility).
    WORDS: tl.constexpr = BLOCK_K // 8
    # tensor cores in k order: a tile lies in one absmax block per row of W (see the launcher)
    ROW_SCALE: tl.constexpr = USE_DOT and not PERMUTED_A
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
    a_rows = a_ptr + offs_m.to(tl.int64) * stride_am  # [BLOCK_M]
    a_row = a_ptr + row0.to(tl.int64) * stride_am
    # Accumulators. Tensor cores: the out^T tile W @ A^T. CUDA cores: per row of A (up to 4 per
    # program, as separate tensors: a [rows, N, words] tensor would be converted between layouts
    # for every code), [BLOCK_N, WORDS] partial sums, summed over words at the end.
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        table_dot = cast_rtne(table, a_ptr.dtype.element_ty, INTERPRET)
    else:
        # rows of A left from row0 on, as tensors (masks must be tensors for the interpreter)
        left = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32) + (M - row0)
        left_n = tl.zeros((BLOCK_N,), dtype=tl.int32) + (M - row0)
        acc0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    # Software pipelining by hand: the next tile's words and absmax are requested before the
    # current tile is decoded, so that a program always has a tile in flight (the loop is
    # otherwise latency bound: a tile's decode waits on its own loads).
    w_rows = w_ptr + row_words[:, None]
    words_next, absmax_next = _tile_loads(w_rows, absmax_ptr, row_blocks, k_begin, offs_w, offs_n, N,
                                          BLOCKSIZE, ROW_SCALE)  # fmt: skip
    if PREFETCH == 2:  # two tiles in flight: the second one's rows are masked off when there is none
        words_next2, absmax_next2 = _tile_loads(w_rows, absmax_ptr, row_blocks, k_begin + BLOCK_K, offs_w, offs_n,
                                                tl.where(tiles > 1, N, 0), BLOCKSIZE, ROW_SCALE)  # fmt: skip
    for tile in tl.range(0, tiles, num_stages=NUM_STAGES):
        k0 = k_begin + tile * BLOCK_K
        word_k = k0 + 8 * offs_w  # first k of each word [WORDS]
        words = words_next
        absmax = absmax_next
        # the tile PREFETCH ahead; no rows after the last tile
        rows_ahead = tl.where(tile + PREFETCH < tiles, N, 0)
        if PREFETCH == 2:
            words_next = words_next2
            absmax_next = absmax_next2
            words_next2, absmax_next2 = _tile_loads(w_rows, absmax_ptr, row_blocks, k0 + 2 * BLOCK_K, offs_w, offs_n,
                                                    rows_ahead, BLOCKSIZE, ROW_SCALE)  # fmt: skip
        else:
            words_next, absmax_next = _tile_loads(w_rows, absmax_ptr, row_blocks, k0 + BLOCK_K, offs_w, offs_n,
                                                  rows_ahead, BLOCKSIZE, ROW_SCALE)  # fmt: skip
        if ROW_SCALE:
            block_index = row_blocks + k0 // BLOCKSIZE  # [BLOCK_N]
            scale_mask = mask_n
        else:
            block_index = row_blocks[:, None] + (word_k // BLOCKSIZE)[None, :]  # [BLOCK_N, WORDS]
            scale_mask = mask_n[:, None]
        scale = _absmax_values(absmax, block_index, scale_mask, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
                               NESTED, ABSMAX_BLOCKSIZE)  # fmt: skip
        if not PERMUTED_A:
            # The whole tile decoded at once, in k order: [BLOCK_N, WORDS, 8] codes (k = 8 w + j)
            # through one gather (each gather stages the table in shared memory between two
            # barriers, so one per tile rather than one per code column), against A as stored.
            code_j = tl.arange(0, 8)
            if USE_DOT:
                # ROW_SCALE: the code values (the table in A's dtype) times A's tile on tensor
                # cores, then times each row's absmax: nothing to scale or convert per element.
                w_tile = tl.reshape(_decode_words(words, table_dot, BLOCK_N, WORDS), [BLOCK_N, BLOCK_K])
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a_t = tl.load(a_rows[None, :] + offs_k[:, None], mask=mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
                if INTERPRET:
                    part = tl.dot(w_tile.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(w_tile, a_t, out_dtype=tl.float32)
                acc += part * scale[:, None]
            else:
                values = _decode_words(words, table, BLOCK_N, WORDS)
                # A's [WORDS, 8] run, loaded in the codes' 3-D layout (broadcast over W's rows);
                # each decoded code serves every row of A in the program.
                a_3d = a_row + tl.broadcast_to((word_k[:, None] + code_j[None, :])[None, :, :], (BLOCK_N, WORDS, 8))
                part0 = tl.sum(values * tl.load(a_3d).to(tl.float32), axis=2)
                if BLOCK_M > 1:
                    left3 = tl.zeros((BLOCK_N, WORDS, 8), dtype=tl.int32) + (M - row0)
                    part1 = tl.sum(values * tl.load(a_3d + stride_am, mask=left3 > 1, other=0.0).to(tl.float32), axis=2)
                if BLOCK_M > 2:
                    part2 = tl.sum(values * tl.load(a_3d + 2 * stride_am, mask=left3 > 2, other=0.0).to(tl.float32), axis=2)
                    part3 = tl.sum(values * tl.load(a_3d + 3 * stride_am, mask=left3 > 3, other=0.0).to(tl.float32), axis=2)
        else:
            if not USE_DOT:
                part0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                part1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                part2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                part3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            # The tile's codes decoded at once, then taken apart into code columns (in-thread).
            columns = _columns(_decode_words(words, table, BLOCK_N, WORDS))
            for j in tl.static_range(8):
                # A is stored as [rows, 8, K / 8]: code j of each word meets the contiguous run
                # j * K / 8 + w.
                a_offsets = j * row_stride_words + (k0 // 8 + offs_w)  # [WORDS]
                value = columns[j]
                if USE_DOT:
                    w_j = cast_rtne(value * scale, a_ptr.dtype.element_ty, INTERPRET)  # as the reference decodes
                    a_t = tl.load(a_rows[None, :] + a_offsets[:, None], mask=mask_m[None, :], other=0.0)  # [WORDS, BLOCK_M]
                    if INTERPRET:
                        # The interpreter's dot mishandles bfloat16; the values are exact in float32.
                        acc += tl.dot(w_j.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                    else:
                        acc = tl.dot(w_j, a_t, acc, out_dtype=tl.float32)
                else:
                    # A's run is loaded in the words' own 2-D layout (broadcast over W's rows): a
                    # 1-D load would be converted to that layout through shared memory, with
                    # barriers. Each decoded code serves every row of A in the program.
                    a_2d = a_row + tl.broadcast_to(a_offsets[None, :], (BLOCK_N, WORDS))
                    part0 += value * tl.load(a_2d).to(tl.float32)
                    if BLOCK_M > 1:
                        part1 += value * tl.load(a_2d + stride_am, mask=left > 1, other=0.0).to(tl.float32)
                    if BLOCK_M > 2:
                        part2 += value * tl.load(a_2d + 2 * stride_am, mask=left > 2, other=0.0).to(tl.float32)
                        part3 += value * tl.load(a_2d + 3 * stride_am, mask=left > 3, other=0.0).to(tl.float32)
        if not USE_DOT:
            acc0 += part0 * scale
            if BLOCK_M > 1:
                acc1 += part1 * scale
            if BLOCK_M > 2:
                acc2 += part2 * scale
                acc3 += part3 * scale

    if HAS_BIAS:  # added once: by the first split of K
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < tl.where(pid_k == 0, N, 0), other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if USE_DOT:
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if REDUCE_LAST and SPLIT_K > 1:
            _reduce_last(out_ptrs, tl.trans(acc) + bias[None, :], mask, partial_ptr, count_ptr, offs_m, offs_n, M, N,
                         pid_k, tl.program_id(2) * tl.num_programs(0) + pid_n, SPLIT_K, INTERPRET)  # fmt: skip
        else:
            _write(out_ptrs, tl.trans(acc) + bias[None, :], mask, SPLIT_K)
    else:
        out_row = out_ptr + row0.to(tl.int64) * stride_om + offs_n
        _write(out_row, tl.sum(acc0, axis=1) + bias, mask_n, SPLIT_K)
        if BLOCK_M > 1:
            _write(out_row + stride_om, tl.sum(acc1, axis=1) + bias, mask_n & (left_n > 1), SPLIT_K)
        if BLOCK_M > 2:
            _write(out_row + 2 * stride_om, tl.sum(acc2, axis=1) + bias, mask_n & (left_n > 2), SPLIT_K)
            _write(out_row + 3 * stride_om, tl.sum(acc3, axis=1) + bias, mask_n & (left_n > 3), SPLIT_K)


@triton.jit
def _gemv_4bit_rows_kernel(
    a_ptr,
    w_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    offset_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    count_ptr,
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
    PERMUTED_A: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BYTE_PAIRS: tl.constexpr = False,
):
    # BLOCK_M = 1, 2 or 4 rows of A (permuted to [rows, 8, K / 8] in float32) and BLOCK_N = 2 or 4
    # rows of W in every thread: the rows are separate 1-D tensors of words or of A's runs (one
    # layout for all of them), joined in-thread, so that each decoded code serves BLOCK_M rows of
    # A and each value of A a thread loads serves BLOCK_N codes, with one table gather per tile.
    # With W's rows spread over threads (``_gemv_4bit_kernel``) every row reloads A through L1,
    # which with the table lookups kept L1 ~84% busy at ~34% of the copy bandwidth (Nsight
    # Compute, H200, 8192x28672, one row). Parameters as ``_gemv_4bit_kernel``'s.
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_w = tl.arange(0, WORDS)
    tiles = K // (SPLIT_K * BLOCK_K)  # per split; the launcher makes this exact
    k_begin = pid_k * tiles * BLOCK_K
    table = tl.load(code_ptr + tl.arange(0, 16))
    # nested: a tile's blocks on one row share their outer scale when the tiles (which start at
    # multiples of BLOCK_K in the flattened weight, K being one) lie within its span
    ONE_OUTER: tl.constexpr = (BLOCKSIZE * ABSMAX_BLOCKSIZE) % BLOCK_K == 0
    offset = tl.load(offset_ptr) if NESTED else 0.0
    n_left = N - n0  # rows of W from n0 on
    rows_left = tl.zeros((WORDS,), dtype=tl.int32) + n_left  # the same as a tensor, for masks
    a_rows_left = tl.zeros((WORDS,), dtype=tl.int32) + (M - row0)  # rows of A from row0 on
    a_row = a_ptr + row0.to(tl.int64) * stride_am
    w0 = w_ptr + n0.to(tl.int64) * row_stride_words
    s0 = n0.to(tl.int64) * row_stride_blocks
    # per row of W: [WORDS, BLOCK_M] (one row of A: [WORDS], 1-D tensors need no layout conversions)
    acc0 = _zeros(WORDS, BLOCK_M)
    acc1 = _zeros(WORDS, BLOCK_M)
    acc2 = _zeros(WORDS, BLOCK_M)
    acc3 = _zeros(WORDS, BLOCK_M)
    if BYTE_PAIRS:
        pair_table = _byte_pair_table(table)
    words_next = _joined_rows(w0 + offs_w, row_stride_words, k_begin // 8, rows_left, 0, BLOCK_N)
    for tile in tl.range(0, tiles, num_stages=NUM_STAGES):
        k0 = k_begin + tile * BLOCK_K
        words = words_next
        ahead = tl.where(tile + 1 < tiles, rows_left, 0)  # nothing to prefetch after the last tile
        words_next = _joined_rows(w0 + offs_w, row_stride_words, (k0 + BLOCK_K) // 8, ahead, 0, BLOCK_N)
        if BYTE_PAIRS:
            columns = _byte_pair_columns(words, pair_table, WORDS, BLOCK_N)  # 8 x [WORDS, BLOCK_N]
        else:
            columns = _columns(_decode_words(words, table, WORDS, BLOCK_N))  # 8 x [WORDS, BLOCK_N]
        part0 = _zeros(WORDS, BLOCK_M)
        part1 = _zeros(WORDS, BLOCK_M)
        part2 = _zeros(WORDS, BLOCK_M)
        part3 = _zeros(WORDS, BLOCK_M)
        if not PERMUTED_A:
            # A as stored (16-bit, one row): the 8 values of word w are A[k0 + 8 w ...], read as
            # four 32-bit pairs per word, each pair two code columns
            first_pairs = a_row.to(tl.pointer_type(tl.int32), bitcast=True) + (k0 // 2 + 4 * offs_w)
            pairs = (tl.load(first_pairs), tl.load(first_pairs + 1), tl.load(first_pairs + 2), tl.load(first_pairs + 3))
        for j in tl.static_range(8):
            if PERMUTED_A:
                # code j of each word meets the run j * K / 8 + w of each row of A
                a_j = _joined_rows(a_row + offs_w, stride_am, j * row_stride_words + k0 // 8, a_rows_left, 0.0,
                                   BLOCK_M)  # fmt: skip
            else:
                a_j = half_of_word(pairs[j // 2], j % 2, a_ptr.dtype.element_ty)
            if BLOCK_N == 2:
                v0, v1 = tl.split(columns[j])
                part0 += _times(v0, a_j, BLOCK_M)
                part1 += _times(v1, a_j, BLOCK_M)
            else:
                even, odd = tl.split(tl.reshape(columns[j], [WORDS, 2, 2]))  # row 2 p + q at [w, p, q]
                v0, v2 = tl.split(even)
                v1, v3 = tl.split(odd)
                part0 += _times(v0, a_j, BLOCK_M)
                part1 += _times(v1, a_j, BLOCK_M)
                part2 += _times(v2, a_j, BLOCK_M)
                part3 += _times(v3, a_j, BLOCK_M)
        word_blocks = _div(k0 + 8 * offs_w, BLOCKSIZE)
        scales = (absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset, _div(k0, BLOCKSIZE), word_blocks)
        s1 = s0 + row_stride_blocks
        scale0 = _row_scale(*scales, s0, rows_left > 0, n_left > 0, NESTED, ABSMAX_BLOCKSIZE, ONE_OUTER)
        scale1 = _row_scale(*scales, s1, rows_left > 1, n_left > 1, NESTED, ABSMAX_BLOCKSIZE, ONE_OUTER)
        acc0 += _times(part0, scale0, BLOCK_M)
        acc1 += _times(part1, scale1, BLOCK_M)
        if BLOCK_N == 4:
            s2 = s0 + 2 * row_stride_blocks
            s3 = s2 + row_stride_blocks
            scale2 = _row_scale(*scales, s2, rows_left > 2, n_left > 2, NESTED, ABSMAX_BLOCKSIZE, ONE_OUTER)
            scale3 = _row_scale(*scales, s3, rows_left > 3, n_left > 3, NESTED, ABSMAX_BLOCKSIZE, ONE_OUTER)
            acc2 += _times(part2, scale2, BLOCK_M)
            acc3 += _times(part3, scale3, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    out_rows = out_ptr + offs_m.to(tl.int64) * stride_om + n0
    mask_m = offs_m < M
    _write_row(out_rows, bias_ptr + n0, tl.sum(acc0, axis=0), mask_m, pid_k, N - n0, 0, HAS_BIAS, SPLIT_K)
    _write_row(out_rows, bias_ptr + n0, tl.sum(acc1, axis=0), mask_m, pid_k, N - n0, 1, HAS_BIAS, SPLIT_K)
    if BLOCK_N == 4:
        _write_row(out_rows, bias_ptr + n0, tl.sum(acc2, axis=0), mask_m, pid_k, N - n0, 2, HAS_BIAS, SPLIT_K)
        _write_row(out_rows, bias_ptr + n0, tl.sum(acc3, axis=0), mask_m, pid_k, N - n0, 3, HAS_BIAS, SPLIT_K)


@triton.jit
def _write_row(ptrs, bias_ptr, sums, mask_m, pid_k, n_left, R: tl.constexpr, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):  # fmt: skip
    """Output column n0 + R (row R of the program's rows of W, ``n_left`` = N - n0) for BLOCK_M
    rows of A: ``sums`` [BLOCK_M] plus the bias (added by the first split of K only)."""
    zero = tl.zeros_like(mask_m.to(tl.int32))  # scalars as tensors: the interpreter's masks must be tensors
    mask = mask_m & (zero + n_left > R)
    if HAS_BIAS:
        sums += tl.load(bias_ptr + R + zero, mask=mask & (zero + pid_k == 0), other=0.0).to(tl.float32)
    _write(ptrs + R, sums, mask, SPLIT_K)


@triton.jit
def _zeros(WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """float32 zeros [WORDS] (one row of A) or [WORDS, BLOCK_M]."""
    if BLOCK_M == 1:
        zeros = tl.zeros((WORDS,), dtype=tl.float32)
    else:
        zeros = tl.zeros((WORDS, BLOCK_M), dtype=tl.float32)
    return zeros


@triton.jit
def _times(x, per_word, BLOCK_M: tl.constexpr):
    """[WORDS] or [WORDS, BLOCK_M] ``x`` times [WORDS] ``per_word`` (or [WORDS] ``x`` times
    [WORDS, BLOCK_M] ``per_word``), broadcast over A's rows."""
    if BLOCK_M == 1 or len(x.shape) == len(per_word.shape):
        product = x * per_word
    elif len(x.shape) == 1:
        product = x[:, None] * per_word
    else:
        product = x * per_word[:, None]
    return product


@triton.jit
def _joined_rows(first, row_stride, offset, rows, other, ROWS: tl.constexpr):
    """``first[offset + r * row_stride]`` for r < ROWS ([WORDS] pointers ``first``; ``other``
    for r at or past ``rows``, a [WORDS] tensor of the rows left), joined in-thread:
    [WORDS, ROWS], row r at [:, r] ([WORDS] for one row)."""
    r0 = tl.load(first + offset, mask=rows > 0, other=other)
    if ROWS == 1:
        joined = r0  # [WORDS]
    else:
        r1 = tl.load(first + offset + row_stride, mask=rows > 1, other=other)
        if ROWS == 2:
            joined = tl.join(r0, r1)
        else:
            r2 = tl.load(first + offset + 2 * row_stride, mask=rows > 2, other=other)
            r3 = tl.load(first + offset + 3 * row_stride, mask=rows > 3, other=other)
            # [w, p, q] holds row 2 p + q (a join appends its dimension last): [w, r] holds row r
            joined = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [r0.shape[0], 4])
    return joined


@triton.jit
def _row_scale(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, offset, tile_block, word_blocks, row_blocks, mask,
               row_ok, NESTED: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, ONE_OUTER: tl.constexpr):  # fmt: skip
    """Each word's absmax [WORDS] on one row of W (its blocks from ``row_blocks`` on), 0 where
    ``mask`` is false (the row does not exist: ``row_ok``, a scalar, is false); nested: decoded
    from its 8-bit code as ``absmax_code[q] * outer + offset``, with ONE_OUTER one outer scale for
    the tile (whose first block is ``tile_block`` on the row), loaded once."""
    block = row_blocks + word_blocks
    absmax = tl.load(absmax_ptr + block, mask=mask, other=0)
    if NESTED:
        inner = tl.load(absmax_code_ptr + absmax.to(tl.int32))
        if ONE_OUTER:
            outer = tl.load(absmax_scale_ptr + _div(row_blocks + tile_block, ABSMAX_BLOCKSIZE), mask=row_ok, other=0.0)
            scale = inner * outer + offset
        else:
            scale = inner * tl.load(absmax_scale_ptr + _div(block, ABSMAX_BLOCKSIZE), mask=mask, other=0.0) + offset
    else:
        scale = absmax
    return scale


@triton.jit
def _div(x, D: tl.constexpr):
    """``x // D`` for non-negative integer ``x``, divided unsigned: a shift for a power of two,
    where a signed division needs sign fix-ups (a dozen instructions for int64)."""
    if x.dtype == tl.int64:
        quotient = (x.to(tl.uint64) // D).to(tl.int64)
    else:
        quotient = (x.to(tl.uint32) // D).to(tl.int32)
    return quotient


@triton.jit
def _absmax_values(absmax, block, mask, absmax_code_ptr, absmax_scale_ptr, offset_ptr, NESTED: tl.constexpr,
                   ABSMAX_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """The float32 absmax of blocks ``block`` as loaded (``absmax``): itself, or nested, its 8-bit
    code decoded as ``absmax_code[q] * absmax_scale[block // ABSMAX_BLOCKSIZE] + offset``."""
    if NESTED:
        outer = tl.load(absmax_scale_ptr + block // ABSMAX_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(absmax_code_ptr + absmax.to(tl.int32)) * outer + tl.load(offset_ptr)
    else:
        scale = absmax
    return scale


@triton.jit
def _tile_loads(w_rows, absmax_ptr, row_blocks, k, offs_w, offs_n, rows, BLOCKSIZE: tl.constexpr,
                ROW_SCALE: tl.constexpr):  # fmt: skip
    """The words [BLOCK_N, WORDS] of the tile from k on and their absmax ([BLOCK_N] with
    ROW_SCALE: the tile is in one block per row; else per word), for the rows of W below ``rows``
    (0 elsewhere)."""
    mask = offs_n[:, None] < rows
    words = tl.load(w_rows + (k // 8 + offs_w)[None, :], mask=mask, other=0)
    if ROW_SCALE:
        absmax = tl.load(absmax_ptr + row_blocks + k // BLOCKSIZE, mask=offs_n < rows, other=0)
    else:
        word_blocks = (k + 8 * offs_w) // BLOCKSIZE
        absmax = tl.load(absmax_ptr + row_blocks[:, None] + word_blocks[None, :], mask=mask, other=0)
    return words, absmax


@triton.jit
def _decode_words(words, table, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """[BLOCK_N, WORDS] words of 8 codes -> [BLOCK_N, WORDS, 8] float32 code values in k order.

    Nibble j is in byte j // 2 of its word, high nibble (even j) first. The codes are joined so
    that a word's 8 stay in its thread (a join adds an in-thread dimension), then looked up in
    one register gather on the 16-entry table. Triton stages the table in shared memory between
    two barriers for every gather, so one gather per tile rather than one per code column; a
    global-memory lookup per element, even from L1, held the kernel to ~30% of the copy
    bandwidth on an H100.
    """
    # A join appends its new dimension last, so the first joins pair codes 4 apart and the last
    # pairs even with odd: [BLOCK_N, WORDS, 2, 2, 2] holds code 4 a + 2 b + c at [..., a, b, c].
    even = tl.join(tl.join((words >> 4) & 15, (words >> 20) & 15), tl.join((words >> 12) & 15, (words >> 28) & 15))
    odd = tl.join(tl.join(words & 15, (words >> 16) & 15), tl.join((words >> 8) & 15, (words >> 24) & 15))
    nibbles = tl.join(even, odd)
    values = tl.gather(table, tl.reshape(nibbles, [BLOCK_N * WORDS * 8]), 0)
    return tl.reshape(values, [BLOCK_N, WORDS, 8])


@triton.jit
def _byte_pair_table(table):
    """The 256 byte values' two codes as one int64 each: the float32 bits of ``table[b >> 4]`` (the
    byte's first code, its high nibble) in the low word, of ``table[b & 15]`` in the high word."""
    b = tl.arange(0, 256)
    first = tl.gather(table, b >> 4, 0).to(tl.int32, bitcast=True).to(tl.uint32).to(tl.int64)
    second = tl.gather(table, b & 15, 0).to(tl.int32, bitcast=True).to(tl.int64)
    return first | (second << 32)


@triton.jit
def _byte_pair_columns(words, pair_table, WORDS: tl.constexpr, ROWS: tl.constexpr):
    """[WORDS, ROWS] words of 8 codes -> their 8 code columns (float32 values, as ``_columns``
    of ``_decode_words`` gives them) through one gather of a byte's two codes per byte: half the
    lookups and index computations of one gather per code."""
    # [WORDS, ROWS, 2, 2] holds byte 2 i + k at [..., i, k] (a join appends its dimension last)
    bytes_ = tl.join(tl.join(words & 255, (words >> 16) & 255), tl.join((words >> 8) & 255, (words >> 24) & 255))
    pairs = tl.reshape(tl.gather(pair_table, tl.reshape(bytes_, [WORDS * ROWS * 4]), 0), [WORDS, ROWS, 2, 2])
    k0, k1 = tl.split(pairs)  # bytes 2 i, 2 i + 1
    byte0, byte2 = tl.split(k0)
    byte1, byte3 = tl.split(k1)
    c0, c1 = _pair_values(byte0)
    c2, c3 = _pair_values(byte1)
    c4, c5 = _pair_values(byte2)
    c6, c7 = _pair_values(byte3)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _pair_values(pair):
    """int64 table entries -> (first code's value, second code's value), float32."""
    first = pair.to(tl.int32).to(tl.float32, bitcast=True)  # the low word
    second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return first, second


@triton.jit
def _columns(values):
    """[..., 8] -> the 8 tensors [...] values[..., j], j = 0..7, by in-thread splits."""
    shape: tl.constexpr = values.shape
    bits = tl.reshape(values, [shape[0], shape[1], 2, 2, 2])  # j = 4 a + 2 b + c at [..., a, b, c]
    even, odd = tl.split(bits)  # splits the last dimension: c = 0 or 1
    e0, e1 = tl.split(even)  # j = 4 a, 4 a + 2
    o0, o1 = tl.split(odd)  # j = 4 a + 1, 4 a + 3
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _write(ptrs, result, mask, SPLIT_K: tl.constexpr):
    """Store float32 partial results (one split of K) or add them to the float32 output (several)."""
    if SPLIT_K == 1:
        tl.store(ptrs, result.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, result, mask=mask)


@triton.jit
def _reduce_last(out_ptrs, result, mask, partial_ptr, count_ptr, offs_m, offs_n, M, N, pid_k, tile,
                 SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Split-K without a zeroed float32 output: each split stores its partial tile to
    ``partial_ptr`` [SPLIT_K, M, N] and counts itself in ``count_ptr[tile]``; the split that
    arrives last sums the partials in split order (deterministic, unlike atomic adds), rounds
    once to the output's dtype, stores, and sets the count back to 0 for the next launch."""
    offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    plane = M.to(tl.int64) * N  # one split's partial tile lies in partial_ptr[split]: [M, N]
    tl.store(partial_ptr + pid_k * plane + offsets, result, mask=mask)
    tl.debug_barrier()  # every thread's partial stores precede the releasing count
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        total = tl.zeros(result.shape, dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            total += tl.load(partial_ptr + split * plane + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptrs, cast_rtne(total, out_ptrs.dtype.element_ty, INTERPRET), mask=mask)
        tl.atomic_xchg(count_ptr + tile, 0)


@lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split_k(n_programs: int, K: int, block_k: int, device: torch.device, programs_per_sm: int = 1) -> int:
    """K-splits so that every multiprocessor gets ``programs_per_sm`` programs; each split a
    whole number of >= 4 tiles."""
    target = _multiprocessors(device) * programs_per_sm
    split = 1
    while n_programs * split < target and K % (split * 2 * block_k) == 0 and K // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def _config(rows: int, N: int, K: int, dtype: torch.dtype) -> Optional[tuple]:
    """The launch configuration for ``rows`` rows of A on an N x K weight (a CONFIGS entry without
    its row limit), with BLOCK_K reduced to divide K; None: not fused."""
    for max_rows, block_m, block_n, block_k, warps, stages, use_dot, permute_a, *rest in CONFIGS:
        pairs_of_a = len(rest) > 2 and rest[2] and not permute_a  # 16-bit A read as 32-bit pairs
        if rows > max_rows or ((use_dot or pairs_of_a) and dtype == torch.float32):
            continue
        if pairs_of_a and N * K > PAIRS_MAX_WEIGHT:
            continue
        while block_k > 8 and K % block_k:
            block_k //= 2
        if K % block_k or (use_dot and block_k < (128 if permute_a else 16)):  # a dot's K >= 16
            return None
        return (block_m, block_n, block_k, warps, stages, use_dot, permute_a, *rest)
    return None


def _as_words(B: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed codes as a 1-D int32 tensor (a view when B is contiguous), None if misaligned."""
    flat = B.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() % 4 or flat.data_ptr() % 16:
        return None
    return flat.view(torch.int32)


class GemvLaunch(KeptLaunch):
    """One configured launch of ``_gemv_4bit_kernel``: every argument but A and the output fixed.

    Built once per (weight, row count, compute dtype, device); ``launch(A)`` multiplies A
    [..., K] (that many rows) with the weight and returns [..., N] in A's dtype. After the first
    launch the compiled kernel is called directly, without Triton's argument binding and cache
    lookup: with 25 arguments that costs as much host time as the kernel takes on a 4096x4096
    weight (:class:`~.kept_launch.KeptLaunch`). The compiled kernel is specialized on A's 16-byte
    alignment and row stride, so an A that differs there goes through the full launch.
    """

    def __init__(self, rows: int, N: int, K: int, dtype: torch.dtype, device: torch.device, words, absmax,
                 nested_args, code, blocksize: int, config, has_bias: bool = False) -> None:  # fmt: skip
        block_m, block_n, block_k, warps, stages, use_dot, permute_a, *rest = config
        programs_per_sm = rest[0] if rest else 1
        prefetch = rest[1] if len(rest) > 1 else 1
        rows_in_thread = bool(rest[2]) if len(rest) > 2 else False
        byte_pairs = bool(rest[3]) if len(rest) > 3 else False
        reduce_last = bool(rest[4]) if len(rest) > 4 else False
        if reduce_last and not use_dot:
            raise ValueError(f"the last split's reduction is a mode of the tensor-core kernel; got {config}")
        if byte_pairs and not rows_in_thread:
            raise ValueError(f"byte-pair decoding is a mode of the kernel with W's rows in each thread; got {config}")
        if prefetch not in (1, 2):
            raise ValueError(f"the gemv kernel keeps 1 or 2 tiles in flight, got prefetch={prefetch}")
        if rows_in_thread and (use_dot or block_m not in (1, 2, 4) or block_n not in (2, 4) or prefetch != 1
                               or (not permute_a and (block_m != 1 or dtype == torch.float32))):  # fmt: skip
            raise ValueError(
                "W's rows in each thread: CUDA cores, BLOCK_M 1, 2 or 4, BLOCK_N 2 or 4, prefetch 1, A not permuted "
                f"only for one row of A of a 16-bit dtype; got {config}"
            )
        if not use_dot and block_m not in (1, 2, 4):
            raise ValueError(f"the CUDA-core gemv kernel takes 1, 2 or 4 rows per program, got BLOCK_M={block_m}")
        if use_dot and not permute_a:
            block_k = min(block_k, blocksize)  # a tile within one absmax block per row
        if K % block_k or K % blocksize or block_k % 8:
            raise ValueError(f"BLOCK_K={block_k} must be a multiple of 8 dividing K={K}, and blocksize={blocksize} K")
        if code.dtype != torch.float32 or not code.is_contiguous():
            code = code.float().contiguous()
        if nested_args is None:
            absmax_code, absmax_scale, offset, absmax_blocksize = absmax, absmax, absmax, 1
        else:
            absmax_code, absmax_scale, offset, absmax_blocksize = nested_args
        n_programs = triton.cdiv(N, block_n)
        m_programs = triton.cdiv(rows, block_m)
        self.split_k = _split_k(n_programs * m_programs, K, block_k, device, programs_per_sm)
        # Split-K reduced by the last split (one launch: no zeroed float32 output, no conversion
        # after): its partial tiles and per-tile arrival counts, kept with the launch, so calls
        # must not overlap (one stream at a time).
        self.reduce_last = reduce_last and self.split_k > 1
        if self.reduce_last:
            self.partials = torch.empty(self.split_k * rows * N, device=device, dtype=torch.float32)
            self.counts = torch.zeros(n_programs * m_programs, device=device, dtype=torch.int32)
        else:
            self.partials = self.counts = words  # unused
        self.rows, self.N, self.K, self.dtype, self.device = rows, N, K, dtype, device
        self.pairs_of_a = rows_in_thread and not permute_a  # one row of A, read as 32-bit pairs
        self.weight_args = (words, absmax, absmax_code, absmax_scale, offset, code)
        constexprs = dict(
            BLOCKSIZE=blocksize,
            NESTED=nested_args is not None,
            ABSMAX_BLOCKSIZE=absmax_blocksize,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SPLIT_K=self.split_k,
            USE_DOT=use_dot,
            PERMUTED_A=permute_a,
            NUM_STAGES=stages,
            PREFETCH=prefetch,
            HAS_BIAS=has_bias,
            INTERPRET=interpreting(),
        )
        if rows_in_thread:
            constexprs["BYTE_PAIRS"] = byte_pairs
        else:
            constexprs["REDUCE_LAST"] = self.reduce_last
        kernel = _gemv_4bit_rows_kernel if rows_in_thread else _gemv_4bit_kernel
        super().__init__(kernel, (n_programs, self.split_k, m_programs), constexprs, warps)

    def launch(self, A: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A [..., K] (``rows`` rows, the launch's dtype and device) -> A @ W.T (+ bias) [..., N].

        ``bias`` ([N], A's dtype) is given exactly when the launch was built with ``has_bias``; it
        is added to the float32 sums before the one rounding to A's dtype."""
        if (bias is not None) != self.constexprs["HAS_BIAS"]:
            raise ValueError(f"this launch was built {'with' if self.constexprs['HAS_BIAS'] else 'without'} a bias")
        a2d = A.reshape(self.rows, self.K)
        if self.constexprs["PERMUTED_A"]:
            # [rows, K / 8, 8] -> [rows, 8, K / 8]: a word's code j meets a contiguous run of A.
            # The CUDA-core kernel takes it in float32 (no conversion per code in the kernel).
            dtype = self.dtype if self.constexprs["USE_DOT"] else torch.float32
            permuted = torch.empty(self.rows, 8, self.K // 8, device=self.device, dtype=dtype)
            permuted.copy_(a2d.reshape(self.rows, self.K // 8, 8).transpose(1, 2))
            a2d = permuted.view(self.rows, self.K)
        elif a2d.stride(1) != 1 or (self.pairs_of_a and (a2d.data_ptr() % 4 or a2d.stride(0) % 2)):
            # (A read as 32-bit pairs: every row must start 4-byte aligned; a new buffer is)
            a2d = a2d.clone(memory_format=torch.contiguous_format)
        atomic = self.split_k != 1 and not self.reduce_last
        if atomic:
            out = torch.zeros(self.rows, self.N, device=self.device, dtype=torch.float32)
        else:
            out = torch.empty(self.rows, self.N, device=self.device, dtype=self.dtype)
        if bias is not None and bias.stride(0) != 1:
            bias = bias.contiguous()
        args = (a2d, *self.weight_args, out if bias is None else bias, out, self.partials, self.counts, self.rows,
                self.N, self.K, self.K // 8, self.K // self.constexprs["BLOCKSIZE"], a2d.stride(0), out.stride(0))  # fmt: skip
        spec = (a2d.data_ptr() % 16 == 0, a2d.stride(0), bias is None or bias.data_ptr() % 16 == 0)
        self._run(args, spec=spec)
        if atomic:
            out = out.to(self.dtype)
        return out.reshape(*A.shape[:-1], self.N)


def _fused_launch(A: torch.Tensor, B: torch.Tensor, N: int, K: int, absmax: torch.Tensor, nested: Optional[tuple],
                  code: torch.Tensor, blocksize: int, has_bias: bool = False) -> Optional[GemvLaunch]:  # fmt: skip
    """The fused kernel's launch for A's rows and dtype, or None where it does not take the
    shape (empty, K not a multiple of blocksize or of a usable BLOCK_K, too many rows) or the
    packed codes are not 16-byte aligned. ``nested``: :func:`~.quant_4bit.nested_args` or None;
    ``has_bias``: the launch adds a bias (``GemvLaunch.launch(A, bias)``)."""
    rows = A.numel() // K if K else 0
    if N == 0 or rows == 0 or K % blocksize:
        return None
    config = _config(rows, N, K, A.dtype)
    words = None if config is None else _as_words(B)
    if words is None:
        return None
    absmax = absmax.contiguous() if nested is not None else absmax.float().contiguous()
    return GemvLaunch(rows, N, K, A.dtype, A.device, words, absmax, nested, code, blocksize, config, has_bias)


def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::gemv_4bit``: A [..., K] times 4-bit W [N, K] transposed -> [..., N].

    Up to 16 rows run the fused kernel (configuration by row count, ``CONFIGS``); more rows, or
    shapes the kernel does not take, decode W with the Triton dequantize kernel and use cuBLAS.
    """
    N, K = int(shapeB[0]), int(shapeB[1])
    if N == 0 or K == 0 or A.numel() == 0:
        return REFERENCES["gemv_4bit"](A, B, shapeB, absmax, code, blocksize)
    launch = _fused_launch(A, B, N, K, absmax, None, code, blocksize)
    if launch is not None:
        return launch.launch(A)
    table = code.to(device=A.device, dtype=torch.float32).contiguous()
    return torch.nn.functional.linear(A, decode_4bit(B, absmax, table, blocksize, [N, K], A.dtype))


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
    launch = None
    if absmax.dtype == torch.uint8:
        nested = nested_args(absmax_code, absmax_scale, offset, absmax_blocksize)
        launch = _fused_launch(A, B, N, K, absmax, nested, code, blocksize)
    if launch is not None:
        return launch.launch(A)
    return REFERENCES["gemv_4bit_nested"](
        A, B, shapeB, absmax, absmax_code, absmax_scale, offset, absmax_blocksize, code, blocksize
    )


def _state_launch(A: torch.Tensor, B: torch.Tensor, state: QuantState, has_bias: bool) -> Optional[GemvLaunch]:
    """A new GemvLaunch for A's rows and dtype on the weight (B, state); None where not fused."""
    if B.device != A.device or state.absmax.device != A.device:
        return None  # functional.gemv_4bit names the misplaced tensor
    if state.nested and state.absmax.dtype != torch.uint8:
        return None
    N, K = int(state.shape[0]), int(state.shape[1])
    code = state.code.to(device=A.device, dtype=torch.float32)
    return _fused_launch(A, B, N, K, state.absmax, nested_absmax_args(state), code, state.blocksize, has_bias)


def state_gemv_launch(
    A: torch.Tensor, B: torch.Tensor, state: QuantState, has_bias: bool = False
) -> Optional[GemvLaunch]:
    """The fused launch for A's row count and dtype on the 4-bit weight (B, state), with a bias
    added in the kernel where ``has_bias``, or None where the kernel does not take it; made on
    first use and kept on ``state`` (see ``kept_launch``)."""
    key = ("gemv_4bit", A.numel() // int(state.shape[1]), A.dtype, A.device, has_bias)
    return kept_launch(state, key, B, lambda: _state_launch(A, B, state, has_bias))
