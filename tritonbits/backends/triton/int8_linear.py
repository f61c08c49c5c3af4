"""LLM.int8()'s inference forward for up to 16 rows in one kernel: quantize, int8 product, outliers.

``int8_mixed_linear(A, CB, SCB, bias, threshold)`` is what ``MatMul8bitLt`` computes when no
weight gradient is needed (``backends/torch/int8.py``: :func:`mixed_linear`): A cast to float16
and quantized row-wise (outliers left out), multiplied with the int8 weight CB [N, K] on int8
tensor cores, dequantized with the row scales (+ bias) in A's dtype; with a threshold, the
columns of A holding an outlier are multiplied in A's dtype against CB's dequantized columns and
added. Unfused that is 4-6 kernels, a host sync (the outlier columns are data-dependent) and
~200 us of host time per call, ten times what a 4096x4096 decode product takes on the GPU.

For up to :data:`FUSED_ROWS` rows one kernel does all of it. Each program owns BLOCK_N outputs
of every row (BLOCK_M = 16, the smallest int8 tensor-core tile) and reads A twice from L2
(A is at most 16 x K): once for the row absmax, once to quantize each K tile in registers just
before its ``tl.dot``. Outlier columns are found per K tile (any row's ``|x| >= threshold``); a
tile holding one also runs a second ``tl.dot`` in A's dtype against that tile of CB dequantized
(``CB * SCB / 127`` rounded to A's dtype, as the reference does). Program 0 writes the outlier
flags [K] (bool), from which ``MatmulLtState.idx`` is derived when read: no host sync here.

Bit-identity: without outlier columns the result equals the reference bit for bit (the int32
product is exact; quantization and dequantization evaluate the reference's float32 expressions
in its order). The outlier product is accumulated in float32 in another order than cuBLAS'
``addmm`` and then added to the rounded int8 result in float32 and rounded once, as ``addmm``
does: within one rounding of A's dtype of the reference.

More rows, and shapes the kernel does not take, run the unfused composition on the Triton
kernels of the parts.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..torch import int8 as reference
from . import cast_rtne, interpreting, round_half_even
from . import int8 as int8_quant
from . import int8_matmul
from .int8 import _chunk_absmax, _row_scale, _threshold_in_dtype
from .int8_matmul import dequantize_values
from .kept_launch import KeptLaunch, kept_launch

# Rows (A.numel() // K) up to which the fused kernel serves; BLOCK_M is 16 whatever the rows.
FUSED_ROWS = 16
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_a(a_rows, offs_k, row_ok, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(a_rows + offs_k[None, :], mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(a_rows + offs_k[None, :], mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _int8_linear_kernel(
    a_ptr, cb_ptr, scb_ptr, bias_ptr, out_ptr, flags_ptr,
    M, N, K, stride_am, stride_cbn, stride_om,
    threshold, inv_127, inv_127_sq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUTLIERS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    ks = tl.arange(0, BLOCK_K)

    # Row absmax of float16(A), outlier entries left out (the reference's row stats).
    absmax = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_a(a_rows, k0 + ks, row_ok, K, EVEN_K).to(tl.float16).to(tl.float32)
        absmax = tl.maximum(absmax, _chunk_absmax(x, threshold, OUTLIERS))
    scale = _row_scale(absmax)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cb_cols = cb_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_cbn  # [BLOCK_K, BLOCK_N] view of CB
    scb = tl.load(scb_ptr + offs_n % N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    outlier_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + ks
        a = _load_a(a_rows, offs_k, row_ok, K, EVEN_K)
        x = a.to(tl.float16).to(tl.float32)
        if OUTLIERS:
            column_flags = tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0)  # [BLOCK_K]
            x = tl.where(column_flags[None, :] != 0, 0.0, x)
        q = round_half_even(x * scale[:, None], INTERPRET).to(tl.int8)
        if EVEN_K:
            cb = tl.load(cb_cols + offs_k[:, None])
        else:
            cb = tl.load(cb_cols + offs_k[:, None], mask=(offs_k < K)[:, None], other=0)
        acc = tl.dot(q, cb, acc, out_dtype=tl.int32)
        if OUTLIERS:
            if pid_n == 0:
                tl.store(flags_ptr + offs_k, (column_flags != 0).to(tl.uint8), mask=offs_k < K)
            if tl.max(column_flags, axis=0) > 0:
                a_out = tl.where(column_flags[None, :] != 0, a, 0.0)
                w = cast_rtne((cb.to(tl.float32) * scb[None, :]) * inv_127, a_ptr.dtype.element_ty, INTERPRET)
                # float32 operands: float16/bfloat16 values are exact in TF32, so the products are
                # those of a 16-bit dot (whose bfloat16 form the interpreter gets wrong); float32 A
                # needs IEEE products.
                outlier_acc = tl.dot(a_out.to(tl.float32), w.to(tl.float32), outlier_acc, input_precision=DOT_PRECISION)

    out = dequantize_values(acc, absmax, scb, bias_ptr, offs_n, N, inv_127_sq, HAS_BIAS, INTERPRET)
    out = cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET)
    if OUTLIERS:
        # addmm: the rounded int8 result plus the outlier product in float32, rounded once.
        if INTERPRET:
            total = out.to(tl.float32) + outlier_acc
        else:
            total = libdevice.add_rn(out.to(tl.float32), outlier_acc)
        out = cast_rtne(total, out_ptr.dtype.element_ty, INTERPRET)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=row_ok[:, None] & (offs_n < N)[None, :])


class Int8LinearLaunch(KeptLaunch):
    """One configured launch of the fused kernel for a weight (CB, SCB), row count and dtype.

    ``launch(A, bias)`` returns (output [..., N] in A's dtype, outlier flags bool [K] or None).
    Kept on the ``MatmulLtState`` by :func:`state_int8_launch`: after the first launch the
    compiled kernel is called directly (:class:`~.kept_launch.KeptLaunch`).
    """

    def __init__(self, rows: int, N: int, K: int, dtype: torch.dtype, device: torch.device, CB, SCB,
                 has_bias: bool, threshold: float) -> None:  # fmt: skip
        block_n = 128 if triton.cdiv(N, 128) >= int8_matmul._multiprocessors(device) else 64
        # The outlier variant also holds a float32 [BLOCK_K, BLOCK_N] dequantized tile: 512-long
        # K tiles then need more shared memory than an H100 has (262 KB of 227 KB at BLOCK_N 64).
        block_k = max(32, min(128 if threshold > 0.0 else 512, triton.next_power_of_2(K)))
        self.rows, self.N, self.K, self.dtype, self.device = rows, N, K, dtype, device
        self.CB, self.SCB = CB, SCB
        self.outliers = threshold > 0.0
        # torch compares float16(A).abs() >= threshold in float16: the threshold rounds first.
        self.threshold = _threshold_in_dtype(threshold, torch.float16) if self.outliers else 0.0
        constexprs = dict(
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, HAS_BIAS=has_bias,
            OUTLIERS=self.outliers, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERPRET=interpreting(),
        )  # fmt: skip
        super().__init__(_int8_linear_kernel, (triton.cdiv(N, block_n),), constexprs, 4)

    def launch(self, A: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        a2d = A.reshape(self.rows, self.K)
        if a2d.stride(1) != 1:
            a2d = a2d.contiguous()
        out = torch.empty(self.rows, self.N, device=self.device, dtype=self.dtype)
        flags = torch.empty(self.K, device=self.device, dtype=torch.bool) if self.outliers else None
        args = (
            a2d, self.CB, self.SCB, bias if bias is not None else self.SCB, out,
            flags.view(torch.uint8) if flags is not None else self.SCB,
            self.rows, self.N, self.K, a2d.stride(0), self.CB.stride(0), out.stride(0),
            self.threshold, reference._INV_127, reference._INV_127_SQUARED,
        )  # fmt: skip
        spec = (a2d.data_ptr() % 16 == 0, a2d.stride(0), None if bias is None else bias.data_ptr() % 16 == 0)
        self._run(args, spec)
        return out.view(*A.shape[:-1], self.N), flags


def _fused_launch(A, CB, SCB, bias, threshold: float) -> Optional[Int8LinearLaunch]:
    """The fused launch for A's rows and dtype, or None where the kernel does not take the call."""
    K = A.shape[-1]
    N = CB.shape[0]
    rows = A.numel() // K if K else 0
    if not (0 < rows <= FUSED_ROWS and N > 0 and A.dtype in _FLOAT_DTYPES):
        return None
    if CB.dtype != torch.int8 or CB.dim() != 2 or CB.shape[1] != K or CB.stride(1) != 1:
        return None
    if SCB.dtype != torch.float32 or SCB.shape != (N,) or not SCB.is_contiguous():
        return None
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        return None
    if any(t.device != A.device for t in (CB, SCB) + ((bias,) if bias is not None else ())):
        return None
    return Int8LinearLaunch(rows, N, K, A.dtype, A.device, CB, SCB, bias is not None, threshold)


# The unfused composition on this backend's kernels (for more rows than the fused kernel takes).
_TRITON_PARTS = types.SimpleNamespace(
    int8_vectorwise_quant=int8_quant.int8_vectorwise_quant,
    int8_vectorwise_dequant=int8_quant.int8_vectorwise_dequant,
    int8_scaled_mm=int8_matmul.int8_scaled_mm,
)


def int8_mixed_linear(A, CB, SCB, bias=None, threshold: float = 0.0):
    """Triton launcher of ``tritonbits::int8_mixed_linear`` (see the module docstring).

    A [..., K] float; CB int8 [N, K]; SCB float32 [N]; bias [N] or None. Returns (output [..., N]
    in A's dtype, bool [K] outlier-column flags or None when ``threshold`` is 0).
    """
    launch = _fused_launch(A, CB, SCB, bias, threshold) if A.numel() else None
    if launch is not None:
        return launch.launch(A, bias)
    return reference.mixed_linear(A, CB, SCB, bias, threshold, _TRITON_PARTS)


def state_int8_launch(A: torch.Tensor, state, bias: Optional[torch.Tensor]) -> Optional[Int8LinearLaunch]:
    """The fused launch for A's rows and dtype on the weight (``state.CB``, ``state.SCB``) of an
    LLM.int8() ``MatmulLtState``, or None where the kernel does not take it; made on first use
    and kept on ``state`` (rebuilt when CB or SCB change, see ``kept_launch``)."""
    threshold = float(state.threshold)
    key = ("int8_mixed_linear", A.numel() // max(A.shape[-1], 1), A.dtype, A.device, threshold,
           None if bias is None else bias.dtype)  # fmt: skip
    return kept_launch(state, key, state.CB, lambda: _fused_launch(A, state.CB, state.SCB, bias, threshold),
                       tensors=[state.SCB])  # fmt: skip
