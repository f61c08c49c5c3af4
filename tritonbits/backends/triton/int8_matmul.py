"""LLM.int8() matrix products on int8 tensor cores: exact int32 GEMM, dequantization, and both fused.

``int8_linear_matmul`` computes ``C = A @ B.T`` for int8 A [M, K] and int8 B [N, K] (the weight as
stored, row-major) with int32 accumulation, exact while K < 2**17 (each product is at most 2**14
in magnitude). ``int8_mm_dequant`` turns such a C into ``C * row_stats[:, None] *
col_stats[None, :] / 127**2 (+ bias)`` in float32, rounded to the output dtype. ``int8_scaled_mm``
does both in one kernel: the int32 tile never leaves registers, so the int32 product (4 bytes per
output element, written and read back) costs no memory traffic.

One tiled GEMM kernel serves all three (the Triton matmul tutorial's structure): a program owns a
BLOCK_M x BLOCK_N output tile, walks K in BLOCK_K steps with ``tl.dot(..., out_dtype=tl.int32)``,
and programs are ordered in groups of GROUP_M tile-rows so that neighbours share B tiles in L2.
B [N, K] is read as [BLOCK_K, BLOCK_N] tiles through its strides (no transpose is materialized).

Tiles come from a fixed rule on M (:func:`_config`; no autotuning, so the decode path stays
CUDA-graph friendly and the choice does not depend on timing noise). The rule and the numbers
below come from the H100 sweep in tests/gpu/check_int8_matmul.py (torch 2.11, triton 3.6):

- M <= 16 (decode): bound by reading B (N*K bytes). BLOCK_M = 16 (the smallest tensor-core
  tile), BLOCK_K = 512 with 3 stages for many bytes in flight, BLOCK_N = 128 where that still
  gives every multiprocessor a program, else 64. One kernel, no split-K: at 4096x4096 (64
  programs on 132 multiprocessors) splitting K 4 ways took 14.8 us against 11.0 us unsplit
  (CUDA-graph replay, weights from HBM); 8192x28672 runs at 85 us, 92% of the copy bandwidth.
  K is split only for very narrow B (under one program per 8 multiprocessors): the partial sums
  meet through int32 atomic adds, exact in any order, then an elementwise kernel dequantizes.
- 16 < M <= 256: 64 x 128 x 128 tiles, 4 warps, 4 stages (within 20% of the best swept config
  at M = 64 and 256 on both shapes, within 3% on three of the four).
- M > 256: 128 x 256 x 128 tiles, 8 warps, 3 stages: 1.75 ms for 4096 x 8192 x 28672 with the
  fused dequantization (1.10 int8 POP/s), against 2.16 ms for ``torch._int_mm``'s int32 alone.

``torch._int_mm`` (cuBLASLt) serves ``int8_linear_matmul`` where it measured faster or equal:
17 <= M <= 128 with K and N multiples of 8 (its own constraints). It never serves
``int8_scaled_mm``: its int32 output would go through memory, and ``_int_mm`` + the dequant
kernel measured 0.97x to 1.74x the fused kernel's time at every M from 17 to 4096.

Results are bit-identical to the references: the int32 product is exact, and the dequantization
evaluates the reference's float32 expression ``(float32(C) * (row * col)) * (1 / 127**2) + bias``
in the same order, the bias added with ``add.rn`` so that it is never contracted into an FMA, then
rounds to the output dtype to nearest-even. (The op's contract is looser: one rounding of the
output dtype.)
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..torch import int8 as reference  # the constant 1 / 127**2, shared so both round alike
from . import cast_rtne, interpreting

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows at or below which the decode configuration (BLOCK_M = 16) is used.
DECODE_ROWS = 16
# Rows up to which the middle configuration serves: (block_m, block_n, block_k, warps, stages).
MID_ROWS = 256
MID_CONFIG = (64, 128, 128, 4, 4)
# Rows for which torch._int_mm (cuBLASLt) computes int8_linear_matmul on CUDA (K, N multiples of 8).
INT_MM_ROWS = (17, 128)
USE_INT_MM = True


@triton.jit
def dequantize_values(acc, row, col, bias_ptr, offs_n, N, inv_127_sq, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 tile [BM, BN] with row [BM] and column [BN] stats -> float32 ``acc * (row * col) *
    inv_127_sq (+ bias)``, in the reference's order."""
    out = (acc.to(tl.float32) * (row[:, None] * col[None, :])) * inv_127_sq
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if INTERPRET:
            out = out + bias[None, :]
        else:
            # add.rn is never contracted with the multiply into an FMA, which would skip the
            # product's rounding and differ from the reference's separate multiply and add.
            out = libdevice.add_rn(out, bias[None, :])
    return out


@triton.jit
def _dequantize_tile(
    acc, row_stats_ptr, col_stats_ptr, bias_ptr, offs_m, offs_n, M, N, inv_127_sq,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """:func:`dequantize_values` with the stats loaded from memory."""
    row = tl.load(row_stats_ptr + offs_m, mask=offs_m < M, other=0.0)
    col = tl.load(col_stats_ptr + offs_n, mask=offs_n < N, other=0.0)
    return dequantize_values(acc, row, col, bias_ptr, offs_n, N, inv_127_sq, HAS_BIAS, INTERPRET)


@triton.jit
def _int8_matmul_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    row_stats_ptr,
    col_stats_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    inv_127_sq,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DEQUANTIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grouped ordering: GROUP_M consecutive tile-rows sweep the tile-columns together, so the B
    # tiles they share are still in L2 when the next tile-row needs them.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_in_group = GROUP_M * tiles_n
    first_m = (pid // tiles_in_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_in_group) % group_rows
    pid_n = (pid % tiles_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge wrap onto valid ones (their results are never stored), so the
    # loads in the K loop need no M or N masks.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * tiles_per_split
    k_last = min(k_first + tiles_per_split, k_tiles)

    offs_k = k_first * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] view of B

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_tile in range(k_first, k_last):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k_tile * BLOCK_K
            a = tl.load(a_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # Integer addition is associative: the split partial sums add up exactly in any order.
        # relaxed: nothing else is ordered against these adds (the next kernel reads the sums).
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    elif DEQUANTIZE:
        out = _dequantize_tile(
            acc, row_stats_ptr, col_stats_ptr, bias_ptr, offs_m, offs_n, M, N, inv_127_sq, HAS_BIAS, INTERPRET
        )
        tl.store(out_ptrs, cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _int8_mm_dequant_kernel(
    a_ptr,
    row_stats_ptr,
    col_stats_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    stride_am,
    stride_an,
    inv_127_sq,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(a_ptr + rows * stride_am + offs_n[None, :] * stride_an, mask=mask, other=0)
    out = _dequantize_tile(
        acc, row_stats_ptr, col_stats_ptr, bias_ptr, offs_m, offs_n, M, N, inv_127_sq, HAS_BIAS, INTERPRET
    )
    tl.store(out_ptr + rows * N + offs_n[None, :], cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


_SM_COUNT: dict = {}


def _multiprocessors(device: torch.device) -> int:
    """Multiprocessors of ``device`` (cached: the query is slow).

    The CPU interpreter answers an H100's 132, so that CI takes the launch decisions (tiles,
    split-K) that the GPU takes.
    """
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@functools.lru_cache(maxsize=1024)
def _config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes, split-K and launch settings for an [M, K] x [N, K] product (a fixed rule).

    Chosen from the H100 sweep of tests/gpu/check_int8_matmul.py (timings in its docstring).
    """
    sms = _multiprocessors(device)
    if M <= DECODE_ROWS:
        # Bound by reading B: long K tiles keep many bytes in flight per program; 128-wide N tiles
        # only where they still give every multiprocessor a program.
        block_n = 128 if triton.cdiv(N, 128) >= sms else 64
        block_m, block_k, warps, stages = 16, 512, 4, 3
    elif M <= MID_ROWS:
        block_m, block_n, block_k, warps, stages = MID_CONFIG
    else:
        block_m, block_n, block_k, warps, stages = 128, 256, 128, 8, 3
    # Small problems: shrink the K tile to K (a power of two, at least 32 for the int8 dot).
    block_k = max(32, min(block_k, triton.next_power_of_2(K)))
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    # Split K only when the tiles would leave most multiprocessors idle (narrow B, decode): a
    # split costs a zero-fill, atomics and, for int8_scaled_mm, a second kernel (measured slower
    # than one program per 64 columns at 4096x4096, M = 1). Each split keeps >= 4 K tiles.
    split_k = 1
    if M <= DECODE_ROWS:
        while programs * split_k * 8 < sms and k_tiles >= 8 * split_k:
            split_k *= 2
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _launch(A2d, B, out, row_stats, col_stats, bias, config: dict, dequantize: bool) -> None:
    """Run the GEMM kernel into ``out`` (int32, or the output dtype when ``dequantize``)."""
    M, K = A2d.shape
    N = B.shape[0]
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
    _int8_matmul_kernel[grid](
        A2d,
        B,
        out,
        row_stats,
        col_stats,
        bias if bias is not None else row_stats,  # placeholder pointer, never read without a bias
        M,
        N,
        K,
        A2d.stride(0),
        A2d.stride(1),
        B.stride(0),
        B.stride(1),
        out.stride(0),
        reference._INV_127_SQUARED,
        EVEN_K=K % config["BLOCK_K"] == 0,
        DEQUANTIZE=dequantize,
        HAS_BIAS=bias is not None,
        INTERPRET=interpreting(),
        **config,
    )


def _rows_2d(A: torch.Tensor) -> torch.Tensor:
    """A [..., K] as [rows, K] (a view where the strides allow; the kernels take any strides)."""
    if A.dim() == 2:
        return A
    return A.reshape(math.prod(A.shape[:-1]), A.shape[-1])  # not -1: K may be 0


def _shaped(out: torch.Tensor, A: torch.Tensor, N: int) -> torch.Tensor:
    """The [rows, N] result viewed as [..., N] with A's leading dims."""
    return out if A.dim() == 2 else out.view(*A.shape[:-1], N)


def _int_mm_serves(A2d: torch.Tensor, N: int, B_contiguous: bool) -> bool:
    M, K = A2d.shape
    rows_ok = INT_MM_ROWS[0] <= M <= INT_MM_ROWS[1]
    # cuBLASLt wants B row- or column-major: B.t() of a contiguous B is column-major.
    return USE_INT_MM and rows_ok and A2d.is_cuda and K % 8 == 0 and N % 8 == 0 and B_contiguous


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Triton launcher of ``tritonbits::int8_linear_matmul``: exact int32 ``A @ B.T``.

    A: int8 [..., K], any strides. B: int8 [N, K], any strides (row-major is fastest).
    Returns a contiguous int32 tensor [..., N].
    """
    A2d = _rows_2d(A)
    M, K = A2d.shape
    N = B.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((*A.shape[:-1], N), dtype=torch.int32, device=A.device)
    if _int_mm_serves(A2d, N, B.is_contiguous()):
        return _shaped(torch._int_mm(A2d.contiguous(), B.t()), A, N)
    config = _config(M, N, K, A.device)
    make = torch.zeros if config["SPLIT_K"] > 1 else torch.empty
    out = make((M, N), dtype=torch.int32, device=A.device)
    _launch(A2d, B, out, out, out, None, config, dequantize=False)
    return _shaped(out, A, N)


def _float_stats(stats: torch.Tensor, length: int, name: str) -> torch.Tensor:
    if stats.dtype == torch.float32 and stats.dim() == 1 and stats.shape[0] == length and stats.is_contiguous():
        return stats  # the common case, without further torch calls (decode is host-bound)
    if stats.numel() != length:
        raise ValueError(f"{name} must hold {length} float32 values (one per row/column), got shape {tuple(stats.shape)}")
    # the kernels read the stats as contiguous float32 (a strided or expanded view read so was wrong)
    return stats.reshape(length).to(torch.float32).contiguous()


def _out_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    dtype = dtype or torch.float16
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return dtype


def _bias(bias: Optional[torch.Tensor], N: int) -> Optional[torch.Tensor]:
    if bias is None or (bias.dim() == 1 and bias.shape[0] == N and bias.is_contiguous()):
        return bias
    if bias.numel() != N:
        raise ValueError(f"bias must hold N = {N} values, got shape {tuple(bias.shape)}")
    return bias.reshape(N).contiguous()


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::int8_mm_dequant``.

    A: int32 [..., N] (an int8 product), any strides. row_stats: float32 [rows] (rows = A.numel()
    / N); col_stats: float32 [N]; bias: [N] of any float dtype, or None. Returns a contiguous
    [..., N] tensor of ``dtype`` (default float16) holding ``A * row * col / 127**2 + bias``.
    """
    A2d = _rows_2d(A)
    M, N = A2d.shape
    dtype = _out_dtype(dtype)
    if M == 0 or N == 0:
        return torch.empty(A.shape, dtype=dtype, device=A.device)
    row_stats = _float_stats(row_stats, M, "row_stats")
    col_stats = _float_stats(col_stats, N, "col_stats")
    bias = _bias(bias, N)
    out = torch.empty((M, N), dtype=dtype, device=A.device)
    _dequantize_into(A2d, row_stats, col_stats, bias, out)
    return out.view(A.shape)


def _dequantize_into(A2d, row_stats, col_stats, bias, out) -> None:
    M, N = A2d.shape
    block_n = min(256, triton.next_power_of_2(N))
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(M)))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int8_mm_dequant_kernel[grid](
        A2d,
        row_stats,
        col_stats,
        bias if bias is not None else row_stats,  # placeholder pointer, never read without a bias
        out,
        M,
        N,
        A2d.stride(0),
        A2d.stride(1),
        reference._INV_127_SQUARED,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        INTERPRET=interpreting(),
        num_warps=4,
    )


def int8_scaled_mm(
    A: torch.Tensor,
    B: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Triton launcher of ``tritonbits::int8_scaled_mm``: ``(A @ B.T) * row * col / 127**2 + bias``.

    A: int8 [..., K]; B: int8 [N, K]; row_stats: float32 [rows of A]; col_stats: float32 [N];
    bias: [N] or None. Returns a contiguous [..., N] tensor of ``dtype`` (default float16). One
    fused kernel, except where K is split across programs (small M): then an exact int32
    accumulation and the elementwise dequantization kernel.
    """
    A2d = _rows_2d(A)
    M, K = A2d.shape
    N = B.shape[0]
    dtype = _out_dtype(dtype)
    if M == 0 or N == 0:
        return torch.empty((*A.shape[:-1], N), dtype=dtype, device=A.device)
    row_stats = _float_stats(row_stats, M, "row_stats")
    col_stats = _float_stats(col_stats, N, "col_stats")
    bias = _bias(bias, N)
    config = _config(M, N, K, A.device)
    out = torch.empty((M, N), dtype=dtype, device=A.device)
    if config["SPLIT_K"] > 1:
        product = torch.zeros((M, N), dtype=torch.int32, device=A.device)
        _launch(A2d, B, product, row_stats, col_stats, bias, config, dequantize=False)
        _dequantize_into(product, row_stats, col_stats, bias, out)
    else:
        _launch(A2d, B, out, row_stats, col_stats, bias, config, dequantize=True)
    return _shaped(out, A, N)
