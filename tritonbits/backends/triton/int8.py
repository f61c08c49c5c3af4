"""Triton kernels for LLM.int8() row-wise quantization and its dequantization.

Semantics are those of ``backends/torch/int8.py`` (bit-identical): for A viewed as [rows, K],
the float32 row absmax ("stats") of the entries below the outlier threshold, and
``round_half_even(x * ((1 / absmax) * 127))`` as int8; outlier entries (``|x| >= threshold``) are 0,
and with more than one row every column holding an outlier is 0 too. The list of outlier
columns is data-dependent, so the launcher finds it with torch ops (one extra read of A).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch import int8 as reference
from . import interpreting, round_half_even

# Columns of a row kept in registers at once; longer rows are read in chunks, twice.
_MAX_COLS = 8192
# Elements one program handles when rows are short (several rows per program).
_TILE = 4096


@triton.jit
def _quantize_rows_chunk(
    x,
    scale,
    columns,
    cols,
    col_flags_ptr,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    ZERO_OUTLIER_COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """int8 codes of one [BLOCK_ROWS, BLOCK_COLS] chunk, outliers (and their columns) zeroed."""
    q = round_half_even(x * scale[:, None], INTERPRET)
    if HAS_THRESHOLD:
        q = tl.where(tl.abs(x) >= threshold, 0.0, q)
        if ZERO_OUTLIER_COLS:
            flags = tl.load(col_flags_ptr + columns, mask=columns < cols, other=0)
            q = tl.where(flags[None, :] != 0, 0.0, q)
    return q.to(tl.int8)


@triton.jit
def _row_scale(absmax):
    """127 / absmax as the reference computes it (torch's ``127.0 / t`` is ``t.reciprocal() * 127``)."""
    reciprocal = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0))
    return tl.where(absmax > 0, reciprocal * 127.0, 0.0)


@triton.jit
def _chunk_absmax(x, threshold, HAS_THRESHOLD: tl.constexpr):
    magnitude = tl.abs(x)
    if HAS_THRESHOLD:
        magnitude = tl.where(magnitude >= threshold, 0.0, magnitude)
    return tl.max(magnitude, axis=1)


@triton.jit
def _int8_vectorwise_quant_kernel(
    a_ptr,
    col_flags_ptr,
    out_ptr,
    stats_ptr,
    rows,
    cols,
    threshold,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    COL_CHUNKS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    ZERO_OUTLIER_COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_starts = row_ids * cols
    col_ids = tl.arange(0, BLOCK_COLS)

    if COL_CHUNKS == 1:
        # Whole rows fit in registers: read A once.
        mask = row_mask[:, None] & (col_ids < cols)[None, :]
        x = tl.load(a_ptr + row_starts[:, None] + col_ids[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = _chunk_absmax(x, threshold, HAS_THRESHOLD)
        scale = _row_scale(absmax)
        q = _quantize_rows_chunk(
            x, scale, col_ids, cols, col_flags_ptr, threshold, HAS_THRESHOLD, ZERO_OUTLIER_COLS, INTERPRET
        )
        tl.store(out_ptr + row_starts[:, None] + col_ids[None, :], q, mask=mask)
    else:
        absmax = tl.zeros([BLOCK_ROWS], tl.float32)
        for chunk in tl.range(0, COL_CHUNKS):
            columns = chunk * BLOCK_COLS + col_ids
            mask = row_mask[:, None] & (columns < cols)[None, :]
            x = tl.load(a_ptr + row_starts[:, None] + columns[None, :], mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, _chunk_absmax(x, threshold, HAS_THRESHOLD))
        scale = _row_scale(absmax)
        for chunk in tl.range(0, COL_CHUNKS):
            columns = chunk * BLOCK_COLS + col_ids
            mask = row_mask[:, None] & (columns < cols)[None, :]
            x = tl.load(a_ptr + row_starts[:, None] + columns[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _quantize_rows_chunk(
                x, scale, columns, cols, col_flags_ptr, threshold, HAS_THRESHOLD, ZERO_OUTLIER_COLS, INTERPRET
            )
            tl.store(out_ptr + row_starts[:, None] + columns[None, :], q, mask=mask)
    tl.store(stats_ptr + row_ids, absmax, mask=row_mask)


@triton.jit
def _int8_vectorwise_dequant_kernel(
    a_ptr, stats_ptr, out_ptr, rows, cols, inv_127, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = row_ids < rows
    mask = row_mask[:, None] & (col_ids < cols)[None, :]
    offsets = row_ids[:, None] * cols + col_ids[None, :]
    a = tl.load(a_ptr + offsets, mask=mask, other=0).to(tl.float32)
    stats = tl.load(stats_ptr + row_ids, mask=row_mask, other=0.0)
    # (a * stats) * (1 / 127) in this order, as the reference computes it (inv_127 is float32).
    tl.store(out_ptr + offsets, (a * stats[:, None]) * inv_127, mask=mask)


def _threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to A's dtype: torch compares ``A.abs() >= threshold`` in that dtype."""
    return torch.tensor(threshold, dtype=torch.float64).to(dtype).item()


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """A [..., K] float -> (int8 [..., K], float32 row stats [rows], int64 outlier columns or None).

    Outlier columns are returned (sorted, int64) only when ``threshold > 0``.
    """
    if A.numel() == 0:
        return reference.int8_vectorwise_quant(A, threshold)
    cols = A.shape[-1]
    A2d = A.contiguous().view(A.numel() // cols, cols)
    col_flags = outlier_column_flags(A2d, threshold)
    out, stats = quantize_rows(A2d, col_flags, threshold)
    outlier_cols = None if col_flags is None else torch.argwhere(col_flags).view(-1)
    return out.view(A.shape), stats, outlier_cols


def outlier_column_flags(A2d: torch.Tensor, threshold: float):
    """bool [cols]: the columns of A2d [rows, cols] holding any ``|x| >= threshold``; None at 0."""
    return (A2d.abs() >= threshold).any(dim=0) if threshold > 0.0 else None


def quantize_rows(A2d: torch.Tensor, col_flags, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous A2d [rows, cols] -> (int8 codes [rows, cols], float32 row stats [rows]), outlier
    entries left out of the stats and 0, and with more than one row the flagged columns 0 too."""
    rows, cols = A2d.shape
    out = torch.empty((rows, cols), dtype=torch.int8, device=A2d.device)
    stats = torch.empty(rows, dtype=torch.float32, device=A2d.device)
    has_threshold = threshold > 0.0
    block_cols = min(triton.next_power_of_2(cols), _MAX_COLS)
    block_rows = min(max(1, _TILE // block_cols), triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_rows),)
    _int8_vectorwise_quant_kernel[grid](
        A2d,
        col_flags.view(torch.uint8) if has_threshold else stats,  # placeholder pointer without a threshold
        out,
        stats,
        rows,
        cols,
        _threshold_in_dtype(threshold, A2d.dtype) if has_threshold else 0.0,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        COL_CHUNKS=triton.cdiv(cols, block_cols),
        HAS_THRESHOLD=has_threshold,
        ZERO_OUTLIER_COLS=has_threshold and rows > 1,
        INTERPRET=interpreting(),
        num_warps=8 if block_rows * block_cols >= 8192 else 4,
    )
    return out, stats


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] with float32 row stats [rows] -> float32 ``A * stats / 127`` shaped like A."""
    if A.numel() == 0:
        return reference.int8_vectorwise_dequant(A, stats)
    cols = A.shape[-1]
    rows = A.numel() // cols
    out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
    block_cols = min(triton.next_power_of_2(cols), 1024)
    block_rows = min(max(1, _TILE // block_cols), triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
    _int8_vectorwise_dequant_kernel[grid](
        A.contiguous(),
        stats.to(torch.float32).contiguous(),
        out,
        rows,
        cols,
        reference._INV_127,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=4,
    )
    return out
