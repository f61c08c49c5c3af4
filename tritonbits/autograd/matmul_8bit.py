"""LLM.int8() matrix multiplication: ``matmul``, its state ``MatmulLtState`` and autograd Functions.

``matmul(A, B)`` computes ``A @ B.T (+ bias)`` for a weight B [N, K] (out_features, in_features)
and activations A [..., K], with B held as int8 rows ``CB`` [N, K] and float32 row scales ``SCB``
[N] (``B ~= CB * SCB[:, None] / 127``). It follows bitsandbytes 0.50.2:

- Inference path (:class:`MatMul8bitLt`): A is cast to float16, quantized row-wise to int8, and
  multiplied with CB in int8; the dequantized product is returned in A's dtype. With
  ``state.threshold > 0`` the columns of A holding any ``|x| >= threshold`` ("outlier columns",
  their indices kept in ``state.idx``) are left out of the int8 product and multiplied in A's
  dtype against the dequantized columns of B instead.
- CPU/XPU training path (:class:`MatMul8bitFp`): when ``state.is_training`` and A is on the CPU
  or an XPU, B is quantized the same way but multiplied dequantized, in A's dtype, with no
  outlier split, as bitsandbytes does on those devices.
- ``state.has_fp16_weights=True``: B is a float weight, re-quantized on every training forward
  (unless it already holds a ``.grad``), and receives a gradient. ``False``: ``state.CB`` and
  ``state.SCB`` are reused; only A (and bias) receive gradients, A's through the dequantized CB.

Where bitsandbytes' arithmetic is wrong, this module computes the right thing and says so:
the int8 weight gradient quantizes grad_output column-wise (bitsandbytes pairs row-quantized
values with column scales) and does not count outlier columns twice. ``out=`` is honoured
(bitsandbytes ignores it), empty inputs give zeros, and inputs of any rank >= 1 are accepted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .. import functional as F
from ..backends import registry

__all__ = ["MatmulLtState", "MatMul8bitLt", "MatMul8bitFp", "matmul"]

# bitsandbytes routes training on these devices to the dequantize-then-matmul Function.
_DEQUANTIZED_TRAINING_DEVICES = ("cpu", "xpu")


@dataclass
class MatmulLtState:
    """What LLM.int8() keeps between calls for one weight (bitsandbytes' ``MatmulLtState``).

    Constructor fields (positional order as in bitsandbytes): ``force_no_igemmlt``, ``CB`` (int8
    [N, K] weight rows), ``SB``, ``SCB`` (float32 [N] row absmax), ``SBt``, ``CBt``, ``subB``,
    ``outlier_pool``, ``idx`` (int64 outlier columns of the last input). Class-level settings,
    assigned after construction: ``threshold`` (outlier threshold on |activation|, 0 = off),
    ``has_fp16_weights``, ``is_training``, ``use_pool``, ``has_accumulated_gradients``.
    ``SB``, ``SBt``, ``CBt``, ``subB`` and ``outlier_pool`` are kept for compatibility and unused.
    """

    force_no_igemmlt: bool = False

    CB: Optional[Tensor] = None
    SB: Optional[Tensor] = None
    SCB: Optional[Tensor] = None

    SBt: Optional[Tensor] = None
    CBt: Optional[Tensor] = None

    subB: Optional[Tensor] = None

    outlier_pool: Optional[Any] = None
    has_accumulated_gradients = False
    threshold = 0.0
    idx: Optional[Tensor] = None
    is_training = True
    has_fp16_weights = True
    use_pool = False

    # Layouts bitsandbytes dropped; TGI and vLLM still read these names, which are always None.
    _deprecated_fields = frozenset({"CxB", "CxBt", "formatB", "_tile_indices"})

    def __getattr__(self, name: str):
        if name in MatmulLtState._deprecated_fields:
            warnings.warn(
                f"MatmulLtState.{name} is deprecated and always None (bitsandbytes removed it).",
                FutureWarning,
                stacklevel=2,
            )
            return None
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getstate__(self) -> dict:
        # Kernel launches kept on the state (backends/triton/kept_launch.py) and the eager plan
        # that holds one (planned_inference_forward) are not copied.
        return {k: v for k, v in self.__dict__.items() if k not in ("_kept_launches", "_eager_plan")}

    def note_outlier_flags(self, flags: Tensor) -> None:
        """Record the last input's outlier columns as bool flags [K]; ``idx`` is derived from them
        when read, so that the forward needs no host sync for it (and traces without one)."""
        self._idx = None
        self._outlier_flags = flags

    def reset_grads(self) -> None:
        """Forget the quantized weight so that the next forward quantizes B again."""
        self.CB = None
        self.SB = None
        self.SCB = None
        self.SBt = None
        self.CBt = None


def _get_idx(state: MatmulLtState) -> Optional[Tensor]:
    flags = getattr(state, "_outlier_flags", None)
    if flags is not None:
        state._idx = torch.argwhere(flags).view(-1)
        state._outlier_flags = None
    return getattr(state, "_idx", None)


def _set_idx(state: MatmulLtState, value: Optional[Tensor]) -> None:
    state._outlier_flags = None
    state._idx = value


# ``idx`` stays a dataclass field (constructor argument, ==, repr) read and written through this.
MatmulLtState.idx = property(_get_idx, _set_idx, doc="int64 outlier columns of the last input, or None")


def _warn_float16_cast(A: Tensor, stacklevel: int) -> None:
    # bitsandbytes quantizes activations from float16 whatever their dtype; results stay identical
    # to theirs, at the cost of float16's range (|x| > 65504 overflows) for bf16/fp32 inputs.
    if A.dtype != torch.float16 and not torch.compiler.is_compiling():
        warnings.warn(
            f"MatMul8bitLt: inputs will be cast from {A.dtype} to float16 during quantization",
            stacklevel=stacklevel + 1,
        )


def _as_float16(A: Tensor) -> Tensor:
    _warn_float16_cast(A, stacklevel=3)
    return A.to(torch.float16)


def _kept_int8_launch(A: Tensor, state: MatmulLtState, bias: Optional[Tensor]):
    """The fused launch kept on ``state`` for A's rows and dtype (``backends/triton/int8_linear.py``),
    or None where the op must be called (not served by Triton, tracing, subclasses)."""
    if type(A) is not Tensor:
        return None
    module = registry.triton_module("int8_mixed_linear", A)
    return None if module is None else module.state_int8_launch(A, state, bias)


def _inference_forward(A: Tensor, B: Tensor, state: MatmulLtState, bias: Optional[Tensor], stacklevel: int) -> Tensor:
    """``A @ B.T + bias`` through int8 with ``state``'s weight (quantized from B where bitsandbytes
    would), without saving anything for B's gradient: one op (three small kernels for up to 16
    rows), outlier columns kept as flags on ``state``. ``stacklevel``: the caller's, for the
    float16 cast warning."""
    _warn_float16_cast(A, stacklevel=stacklevel + 1)
    _quantize_weight(state, B)
    _require_weight(state)
    launch = _kept_int8_launch(A, state, bias)
    if launch is not None:
        output, flags = launch.launch(A, bias)
        _keep_plan(A, bias, state, launch)
    else:
        output, flags = F.int8_mixed_linear(A, state.CB, state.SCB, bias, float(state.threshold))
    if flags is not None:
        state.note_outlier_flags(flags)
    return output


def _keep_plan(A: Tensor, bias: Optional[Tensor], state: MatmulLtState, launch) -> None:
    """Remember what this inference call through a kept launch was checked against (see
    :func:`planned_inference_forward`)."""
    from ..backends.triton.kept_launch import launch_sources  # a launch was kept: Triton imports

    CB, SCB = state.CB, state.SCB
    bias_key = None if bias is None else (bias.dtype, bias.shape)  # its values are read at each launch
    # The sources are what state_int8_launch's kept_launch checks the launch against.
    state.__dict__["_eager_plan"] = (
        A.shape, A.dtype, A.device, CB, SCB, bias, bias_key, state.threshold, launch_sources,
        launch_sources(CB, [SCB]), launch,
    )  # fmt: skip


def planned_inference_forward(A: Tensor, B: Tensor, bias: Optional[Tensor], state: MatmulLtState) -> Optional[Tensor]:
    """``matmul(A, B, state=state, bias=bias)`` for an eager inference call like the last one
    that went through a kept launch (same input shape, dtype and device, the same weight, scales,
    bias and threshold, CB and SCB unchanged as ``kept_launch`` checks them), by that launch
    alone; None when anything differs or the call needs another path (a gradient, weight
    requantization, tracing, dispatch modes or tensor subclasses): then the caller takes
    ``matmul``'s.

    Linear8bitLt's forward calls this first. Host time per layer call with the kernels stubbed
    out (CPU, 4096x4096, one row): 26 us through ``matmul``, 11-12 us through the plan, of which
    the kept launch's own work is 6 and the sources check 2; on an H200 host one row of 4096x4096
    took 29 us per eager call with the plan (two kernel launches; ``tests/gpu/int8_decode.py``,
    measured when the plan checked CB and SCB by version and address alone)."""
    if type(A) is not Tensor or not registry.may_skip_dispatch(A):  # tracing first: compiled code never reads the plan
        return None
    plan = state.__dict__.get("_eager_plan")
    if plan is None:
        return None
    shape, dtype, device, CB, SCB, planned_bias, bias_key, threshold, sources_of, sources, launch = plan
    if (
        A.shape != shape
        or A.dtype != dtype
        or state.CB is not CB
        or state.SCB is not SCB
        or bias is not planned_bias
        or state.threshold != threshold
        or (state.has_fp16_weights and state.is_training)
        or (state.is_training and device.type in _DEQUANTIZED_TRAINING_DEVICES)
        or A.device != device
    ):
        return None
    if bias is not None and (bias.dtype, bias.shape) != bias_key:
        return None
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if sources_of(CB, [SCB]) != sources:  # CB or SCB changed in place, or CB's storage or view
        return None
    _warn_float16_cast(A, stacklevel=3)
    output, flags = launch.launch(A, bias)
    if flags is not None:
        state.note_outlier_flags(flags)
    return output


def _quantize_weight(state: MatmulLtState, B: Tensor) -> None:
    """Fill ``state.CB``/``state.SCB`` from B when bitsandbytes would (re)quantize it."""
    if not (state.has_fp16_weights or state.CB is None):
        return
    has_grad = getattr(B, "grad", None) is not None
    if not ((state.is_training and not has_grad) or state.CB is None or state.SCB is None):
        return
    state.reset_grads()
    if B.dtype == torch.int8:
        # An already quantized weight (Int8Params) carries its own scales.
        SCB = getattr(B, "SCB", None)
        if SCB is None:
            raise ValueError("B is int8 but carries no SCB row scales; pass a state with CB and SCB set, or a float B")
        state.CB, state.SCB = B.detach(), SCB
        return
    state.CB, state.SCB, _ = F.int8_vectorwise_quant(B.detach().to(torch.float16).contiguous())


def _require_weight(state: MatmulLtState) -> None:
    if state.CB is None or state.SCB is None:
        raise RuntimeError("MatmulLtState must hold CB and SCB (the int8 weight) for this operation")


def _dequantized_weight(state: MatmulLtState, dtype: torch.dtype) -> Tensor:
    """``CB * SCB / 127`` [N, K] in ``dtype`` (same operation order as bitsandbytes)."""
    _require_weight(state)
    return state.CB.to(dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))


def _empty_output_shape(A: Tensor, B: Tensor) -> tuple[int, ...]:
    # bitsandbytes' rule for empty inputs, which also accepts B laid out [K, N].
    if A.shape[-1] == B.shape[0]:
        return (*A.shape[:-1], *B.shape[1:])
    return (*A.shape[:-1], *B.shape[:1])


def _mixed_scaled_mm(
    A: Tensor, CA: Tensor, CB: Tensor, SCA: Tensor, SCB: Tensor, outlier_cols: Optional[Tensor], bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """int8 product of the regular columns plus the outlier columns' product in A's dtype.

    A [M, K] (A's dtype), CA [M, K] int8 with outlier columns zeroed, CB [N, K] int8, SCA [M],
    SCB [N] float32. Returns (output [M, N] in A's dtype, A's outlier columns [M, n_outliers]).
    """
    output = F.int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if outlier_cols is None or outlier_cols.numel() == 0:
        return output, A.new_empty(0)
    subA = A[:, outlier_cols].contiguous()
    subB = F.int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype).t()
    return output.addmm(subA, subB), subA


class MatMul8bitLt(torch.autograd.Function):
    """``A @ B.T + bias`` through int8 (LLM.int8()); see the module docstring.

    forward(A [..., K] float, B [N, K] float or int8, out (unused), bias [N] or None,
    state) -> [..., N] in A's dtype.
    """

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, out=None, bias: Optional[Tensor] = None, state=None):
        state = state or MatmulLtState()
        ctx.state = state
        ctx.is_empty = A.numel() == 0
        if ctx.is_empty:
            ctx.shapes = (A.shape, B.shape, None if bias is None else bias.shape)
            return A.new_zeros(_empty_output_shape(A, B))

        input_shape = A.shape
        ctx.grad_shape = input_shape
        ctx.dtype_A = A.dtype
        ctx.dtype_B = B.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        if not ctx.needs_input_grad[1]:
            # Nothing saved for B's gradient: the inference op (outlier columns as flags).
            return _inference_forward(A, B, state, bias, stacklevel=3)

        # B's gradient needs the column-wise copy of A too.
        A2d = A.reshape(-1, A.shape[-1])
        CA, CAt, SCA, SCAt, outlier_cols = F.int8_double_quant(_as_float16(A2d), threshold=state.threshold)
        _quantize_weight(state, B)
        if state.threshold > 0.0:
            state.idx = outlier_cols
            output, subA = _mixed_scaled_mm(A2d, CA, state.CB, SCA, state.SCB, outlier_cols, bias)
            if outlier_cols.numel():
                # These columns reach B's gradient exactly, through subA, not through int8.
                CAt[:, outlier_cols] = 0
        else:
            output = F.int8_scaled_mm(CA, state.CB, SCA, state.SCB, bias=bias, dtype=A.dtype)
            subA = outlier_cols = None
        ctx.save_for_backward(CAt, SCAt, subA, outlier_cols)
        return output.reshape(*input_shape[:-1], state.CB.shape[0])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        req_gradA, req_gradB, _, req_gradBias, _ = ctx.needs_input_grad
        if ctx.is_empty:
            A_shape, B_shape, bias_shape = ctx.shapes
            zeros = grad_output.new_zeros
            return (
                zeros(A_shape) if req_gradA else None,
                zeros(B_shape) if req_gradB else None,
                None,
                zeros(bias_shape) if req_gradBias else None,
                None,
            )

        state: MatmulLtState = ctx.state
        grad2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_A = grad_B = grad_bias = None

        if req_gradBias:
            grad_bias = grad2d.sum(0, dtype=ctx.dtype_bias)

        if req_gradB:
            CAt, SCAt, subA, idx = ctx.saved_tensors
            # grad_B [N, K] = grad.T @ A: the scales must run along N and K, the output's axes,
            # so both grad and A are quantized column-wise here.
            _, Cgrad_col, _, SCgrad_col, _ = F.int8_double_quant(grad2d.to(torch.float16))
            grad_B = F.int8_scaled_mm(
                Cgrad_col.t().contiguous(), CAt.t().contiguous(), SCgrad_col, SCAt, dtype=torch.float32
            )
            if idx is not None and idx.numel():
                grad_B[:, idx] += grad2d.t().float() @ subA.float()
            grad_B = grad_B.to(ctx.dtype_B)

        if req_gradA:
            CB = _dequantized_weight(state, ctx.dtype_A)
            grad_A = torch.matmul(grad2d.to(ctx.dtype_A), CB).view(ctx.grad_shape)

        return grad_A, grad_B, None, grad_bias, None


class MatMul8bitFp(torch.autograd.Function):
    """``A @ dequant(B).T + bias`` in A's dtype: bitsandbytes' training path on CPU and XPU.

    B is quantized to int8 exactly as in :class:`MatMul8bitLt` and multiplied dequantized, with
    no outlier decomposition. B's gradient (has_fp16_weights) is the exact ``grad.T @ A``.
    """

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, out=None, bias: Optional[Tensor] = None, state=None):
        state = state or MatmulLtState()
        _quantize_weight(state, B)
        output = torch.nn.functional.linear(A, _dequantized_weight(state, A.dtype), bias)
        ctx.state = state
        ctx.grad_shape = A.shape
        ctx.dtype_A = A.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        ctx.save_for_backward(A if ctx.needs_input_grad[1] else None)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        req_gradA, req_gradB, _, req_gradBias, _ = ctx.needs_input_grad
        (A,) = ctx.saved_tensors
        grad2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_A = grad_B = grad_bias = None
        if req_gradBias:
            grad_bias = grad2d.sum(0, dtype=ctx.dtype_bias)
        if req_gradB:
            grad_B = torch.matmul(grad2d.t(), A.reshape(-1, A.shape[-1]).to(grad2d.dtype))
        if req_gradA:
            CB = _dequantized_weight(ctx.state, ctx.dtype_A)
            grad_A = torch.matmul(grad2d.to(ctx.dtype_A), CB).view(ctx.grad_shape)
        return grad_A, grad_B, None, grad_bias, None


def _needs_autograd(A: Tensor, B: Tensor, bias: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return A.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad)


def matmul(
    A: Tensor,
    B: Tensor,
    out: Optional[Tensor] = None,
    state: Optional[MatmulLtState] = None,
    threshold: float = 0.0,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """LLM.int8() ``A @ B.T + bias`` with bitsandbytes' ``matmul`` signature and semantics.

    Args:
        A: activations [..., K], float16 (bfloat16/float32 are cast to float16 for quantization).
        B: weight [N, K]: float (quantized here, per ``state``) or int8 Int8Params with ``SCB``.
        out: optional tensor [..., N] of A's dtype that receives the result.
        state: a :class:`MatmulLtState` kept across calls (a fresh one when None).
        threshold: when > 0, sets ``state.threshold`` (outlier threshold on |A|).
        bias: optional [N], in A's dtype.

    Returns:
        [..., N] in A's dtype (``out`` when given).
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if not isinstance(B, Tensor):
        raise TypeError(f"B must be a torch.Tensor, got {type(B).__name__}")
    if A.dim() < 1 or B.dim() != 2:
        raise ValueError(f"A must be [..., K] and B [N, K]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    if state.is_training and A.device.type in _DEQUANTIZED_TRAINING_DEVICES:
        result = MatMul8bitFp.apply(A, B, out, bias, state)
    elif A.numel() and not _needs_autograd(A, B, bias):
        # No gradient to compute (inference): skip the autograd Function and its host time.
        result = _inference_forward(A, B, state, bias, stacklevel=2)
    else:
        result = MatMul8bitLt.apply(A, B, out, bias, state)
    if out is not None:
        return out.copy_(result)
    return result
