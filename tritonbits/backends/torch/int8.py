"""Reference LLM.int8() ops: row-wise int8 quantization with outlier columns, int8 matmul, dequant.

Scales ("stats") are the float32 absolute maxima of each row (or column); a value ``x`` in a
row with absmax ``s`` is stored as ``round(x * 127 / s)``. With a threshold > 0, entries with
``|x| >= threshold`` are outliers: they are left out of the stats and stored as 0, and every
column holding one is reported so that it can be multiplied in 16-bit instead.
"""

from __future__ import annotations

import math

from typing import Optional

import torch

from ..._ops import register_reference

_INV_127 = 1.0 / 127
# bitsandbytes writes this as 6.200124e-05, 1.8e-5 above the true value; we use the true value.
_INV_127_SQUARED = 1.0 / (127 * 127)


def outlier_mask(A2d: torch.Tensor, threshold: float) -> Optional[torch.Tensor]:
    """Boolean mask of ``|A| >= threshold``, or None when the threshold is off (0)."""
    return A2d.abs() >= threshold if threshold > 0.0 else None


def quantize_rows(A2d: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float -> (int8 [rows, cols], float32 row absmax [rows]); masked entries -> 0."""
    if mask is not None:
        A2d = A2d.masked_fill(mask, 0.0)
    row_stats = A2d.abs().amax(dim=1).float() if A2d.shape[1] else A2d.new_zeros(A2d.shape[0], dtype=torch.float32)
    scale = torch.where(row_stats > 0, 127.0 / row_stats, torch.zeros_like(row_stats))
    return torch.round(A2d * scale.unsqueeze(1)).to(torch.int8), row_stats


def _rows(A: torch.Tensor) -> torch.Tensor:
    """A [..., K] as [rows, K]; unlike ``reshape(-1, K)`` also for K = 0 (an empty last dim)."""
    return A.reshape(math.prod(A.shape[:-1]), A.shape[-1])


@register_reference("int8_vectorwise_quant")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """A [..., K] float -> (int8 [..., K], float32 row stats [rows], int64 outlier columns or None)."""
    A2d = _rows(A)
    mask = outlier_mask(A2d, threshold)
    out, row_stats = quantize_rows(A2d, mask)
    outlier_cols = None
    if mask is not None:
        outlier_cols = torch.argwhere(mask.any(dim=0)).view(-1)
        if A2d.shape[0] > 1:
            out[:, outlier_cols] = 0
    return out.view(A.shape), row_stats, outlier_cols


@register_reference("int8_vectorwise_dequant")
def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] and row stats [rows] -> float32 ``A * stats / 127``."""
    return (_rows(A) * stats.view(-1, 1) * _INV_127).view(A.shape)


@register_reference("int8_linear_matmul")
def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """int8 A [..., K] and B [N, K] -> exact int32 ``A @ B.T`` [..., N].

    float64 holds every partial sum exactly while K < 2**53 / 127**2, and runs on every device.
    """
    return torch.matmul(A.double(), B.double().t()).to(torch.int32)


@register_reference("int8_mm_dequant")
def int8_mm_dequant(A, row_stats, col_stats, dtype: Optional[torch.dtype] = None, bias=None) -> torch.Tensor:
    """int32 [..., N] -> ``A * row_stats * col_stats / 127**2 (+ bias)`` in ``dtype`` (default float16)."""
    A2d = _rows(A)
    out = A2d * (row_stats.reshape(-1, 1) * col_stats.reshape(1, -1)) * _INV_127_SQUARED
    if bias is not None:
        out = out + bias
    return out.to(dtype or torch.float16).view(A.shape)


@register_reference("int8_double_quant")
def int8_double_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise and column-wise int8 quantization of A [..., K] (for training).

    Returns (int8 rows, int8 cols, float32 row stats [rows], float32 col stats [K], outlier columns).
    """
    out_row, row_stats, outlier_cols = int8_vectorwise_quant(A, threshold)
    A2d = _rows(A)
    mask = outlier_mask(A2d, threshold)
    if mask is not None:
        A2d = A2d.masked_fill(mask, 0.0)
    col_stats = A2d.abs().amax(dim=0).float() if A2d.shape[0] else A2d.new_zeros(A2d.shape[1], dtype=torch.float32)
    # (A * 127) rounds in A's dtype before the float32 division, as bitsandbytes computes it.
    scaled = A2d.mul(127.0) / torch.where(col_stats > 0, col_stats, torch.ones_like(col_stats)).unsqueeze(0)
    out_col = torch.round(scaled).to(torch.int8)
    return out_row, out_col.view(A.shape), row_stats, col_stats, outlier_cols


@register_reference("int8_scaled_mm")
def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """int8 A [..., K], B [N, K] with their row stats -> dequantized ``A @ B.T (+ bias)`` in ``dtype``."""
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias)


@register_reference("int8_mixed_linear")
def int8_mixed_linear(A, CB, SCB, bias=None, threshold: float = 0.0):
    """LLM.int8() inference forward ``A @ dequant(CB).T + bias`` with outlier columns in A's dtype.

    A [..., K] float; CB int8 [N, K]; SCB float32 [N] row absmax of the weight; bias [N] or None.
    As bitsandbytes' ``MatMul8bitLt``: A is cast to float16 and quantized row-wise; the int8
    product with CB is dequantized (+ bias) in A's dtype; with a threshold, A's outlier columns
    are multiplied in A's dtype against the dequantized columns of CB and added (``addmm``).
    Returns (output [..., N] in A's dtype, bool [K] outlier-column flags, None without threshold).
    """
    K = A.shape[-1]
    A2d = _rows(A)
    CA, SCA, outlier_cols = int8_vectorwise_quant(A2d.to(torch.float16), threshold)
    out = int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    flags = None
    if threshold > 0.0:
        flags = torch.zeros(K, dtype=torch.bool, device=A.device)
        flags[outlier_cols] = True
        if outlier_cols.numel():
            subB = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype)
            out = out.addmm(A2d[:, outlier_cols], subB.t())
    return out.view(*A.shape[:-1], CB.shape[0]), flags
