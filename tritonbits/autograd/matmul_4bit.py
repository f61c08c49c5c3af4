"""``matmul_4bit``: ``A @ W.T (+ bias)`` with W held as packed 4-bit NF4/FP4 codes (QLoRA).

Forward: for up to 16 input rows without autograd, the fused ``tritonbits::gemv_4bit`` op (a
Triton kernel on GPU); otherwise W is dequantized into the compute dtype (A's dtype) by
``tritonbits::dequantize_4bit`` and multiplied with ``torch.nn.functional.linear``.

Backward (``MatMul4Bit``): the gradient of A is ``grad_output @ W``, with W dequantized again
inside backward. Only the packed codes are saved for backward, so a full-precision copy of W
lives for one matmul at a time, never from forward to backward. W is frozen: no gradient.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F
from ..backends import registry
from ..quant_state import QuantState

__all__ = ["MatMul4Bit", "matmul_4bit"]

# Inputs with at most this many rows (without autograd) go to ``gemv_4bit``, whose launcher picks
# a fused kernel or dequantize + matmul by measured speed.
GEMV_MAX_ROWS = 16


def dequantize_weight(B: Tensor, quant_state: QuantState, dtype: torch.dtype) -> Tensor:
    """Packed codes B -> W of ``quant_state.shape`` in ``dtype`` (one rounding, float32 -> dtype)."""
    module = _kept_launch_module("dequantize_4bit", B, quant_state)
    launch = None if module is None else module.state_dequant_launch(B, quant_state, dtype)
    if launch is not None:
        return launch.launch()
    in_dtype = QuantState(
        absmax=quant_state.absmax,
        shape=quant_state.shape,
        code=quant_state.code,
        blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type,
        dtype=dtype,
        offset=quant_state.offset,
        state2=quant_state.state2,
    )
    # 1-D codes: functional.dequantize_4bit transposes results of [1, n] packed inputs.
    return F.dequantize_4bit(B.reshape(-1), in_dtype)


def _dequantize_and_multiply(A: Tensor, B: Tensor, quant_state: QuantState, bias: Optional[Tensor]) -> Tensor:
    """A [..., K] @ W.T + bias -> [..., N] in A's dtype, via a dequantized W [N, K]."""
    if A.numel() == 0:
        return A.new_zeros((*A.shape[:-1], quant_state.shape[0]))
    return torch.nn.functional.linear(A, dequantize_weight(B, quant_state, A.dtype), bias)


class MatMul4Bit(torch.autograd.Function):
    """Autograd for ``A @ W.T + bias`` with a frozen 4-bit W; gradients for A and bias only."""

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, out: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                quant_state: Optional[QuantState] = None) -> Tensor:  # fmt: skip
        output = _dequantize_and_multiply(A, B, quant_state, bias)
        if out is not None:
            output = out.copy_(output)
        ctx.quant_state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(B)  # the packed codes: W is rebuilt in backward, not kept
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (B,) = ctx.saved_tensors
        needs_grad_A, _, _, needs_grad_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        if needs_grad_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        if needs_grad_A:
            weight = dequantize_weight(B, ctx.quant_state, grad_output.dtype)
            grad_A = torch.matmul(grad_output, weight)
        return grad_A, None, None, grad_bias, None


def _kept_launch_module(op: str, tensor: Tensor, quant_state: QuantState):
    """The Triton kernel module of ``op`` where this eager call may use a launch kept on
    ``quant_state`` (``registry.triton_module``), else None (then the op is called).

    Going through the functional API, the op and the kernel launcher costs 50-200 us of host
    time per call, more than a decode kernel takes and enough to leave the GPU idle in QLoRA
    training; a kept launch does that work once per layer."""
    if not isinstance(quant_state, QuantState):
        return None
    return registry.triton_module(op, tensor)


def _kernel_bias(bias: Optional[Tensor], A: Tensor, quant_state: QuantState) -> bool:
    """Whether the gemv kernel adds ``bias`` itself: an [N] tensor of A's dtype on A's device
    (anything else is added after the kernel, with broadcasting)."""
    return (
        type(bias) is Tensor
        and bias.shape == (quant_state.shape[0],)
        and bias.dtype == A.dtype
        and bias.device == A.device
    )


def _prepared_gemv(A: Tensor, B: Tensor, quant_state: QuantState, has_bias: bool):
    """The fused gemv launch kept on ``quant_state`` for A's rows and dtype (adding the bias
    where ``has_bias``), or None."""
    if type(A) is not Tensor:
        return None
    module = _kept_launch_module("gemv_4bit", A, quant_state)
    return None if module is None else module.state_gemv_launch(A, B, quant_state, has_bias)


def _keep_plan(A: Tensor, B: Tensor, bias: Optional[Tensor], quant_state: QuantState, launch) -> None:
    """Remember what this eager call through a kept gemv launch was checked against (see
    :func:`planned_matmul_4bit`)."""
    from ..backends.triton.kept_launch import quant_state_sources  # a launch was kept: Triton imports

    sources = quant_state_sources(B, quant_state)
    quant_state.__dict__["_eager_plan"] = (A.shape, A.dtype, A.device, B, bias, quant_state_sources, sources, launch)


def planned_matmul_4bit(A: Tensor, B: Tensor, quant_state: QuantState, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``matmul_4bit(A, B, quant_state, bias=bias)`` for an eager call like the last one that went
    through a kept gemv launch (same input shape, dtype and device, the same B and bias objects,
    B and the state's tensors unchanged: the check :func:`~..backends.triton.kept_launch.kept_launch`
    makes), by that launch alone; None when anything differs or the call needs another path (a
    gradient, tracing, dispatch modes, tensor subclasses): then the caller calls ``matmul_4bit``.

    Linear4bit's forward calls this first. Host time per layer call with the kernel stubbed out
    (CPU, 4096x4096, one row, bf16, nested absmax): 43-45 us through ``matmul_4bit``, 28-31 us
    with the plan; the kept launch's own work (A permuted, the output allocated) is most of the
    rest. On an H200 host (``tests/gpu/launch_overhead.py``, 2026-12-03): 48.7 us per eager layer
    call back to back, of which the kept launch is 35.7 us (bf16 ``nn.Linear`` 21.5 us)."""
    if type(A) is not Tensor or not registry.may_skip_dispatch(A):  # tracing first: compiled code never reads the plan
        return None
    plan = quant_state.__dict__.get("_eager_plan") if isinstance(quant_state, QuantState) else None
    if plan is None:
        return None
    shape, dtype, device, planned_B, planned_bias, sources_of, sources, launch = plan
    if (
        B is not planned_B
        or bias is not planned_bias
        or A.shape != shape
        or A.dtype != dtype
        or A.device != device
        or (bias is not None and bias.dtype != dtype)
    ):
        return None
    if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if sources_of(B, quant_state) != sources:
        return None
    return _launch_with_bias(launch, A, bias)


def _launch_with_bias(launch, A: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``launch.launch(A)`` plus ``bias``: added by the kernel where the launch was built for it
    (:func:`_kernel_bias`), else after it (with broadcasting)."""
    if launch.constexprs["HAS_BIAS"]:
        return launch.launch(A, bias)
    result = launch.launch(A)
    return result + bias if bias is not None else result


def _check_arguments(A, B, quant_state) -> None:
    if quant_state is None:
        raise ValueError("quant_state is required: pass the QuantState returned by quantize_4bit (weight.quant_state)")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError(f"quant_state.shape must be the 2-D weight shape [N, K], got {quant_state.shape}")
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        raise TypeError(f"A and B must be tensors, got {type(A).__name__} and {type(B).__name__}")
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"A must be float16, bfloat16 or float32, got {A.dtype}")
    if A.shape[-1] not in tuple(quant_state.shape):
        raise ValueError(
            f"A's last dimension ({A.shape[-1]}) must equal the weight's in_features K "
            f"(quant_state.shape = [N, K] = {list(quant_state.shape)})"
        )


def matmul_4bit(
    A: Tensor,
    B: Tensor,
    quant_state: QuantState,
    out: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``A @ W.T + bias`` where W [N, K] is stored as packed 4-bit codes B with ``quant_state``.

    Args:
        A: [..., K] float16/bfloat16/float32 input; its dtype is the compute dtype.
        B: the packed codes (``Params4bit`` or its data, any quant_storage; ``B.t()`` also works).
        quant_state: W's QuantState (shape [N, K]).
        out: optional [..., N] tensor of A's dtype to receive the result.
        bias: optional [N] bias, cast to A's dtype.

    Returns:
        [..., N] in A's dtype. Differentiable in A and bias (not W).
    """
    _check_arguments(A, B, quant_state)
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    N, K = quant_state.shape

    if A.shape[-1] == N and N != K:
        # The weight was quantized from a [K, N] tensor (bitsandbytes' old layout).
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"matmul_4bit: the weight was quantized from a [K, N] tensor (quant_state.shape={list(quant_state.shape)}); "
                "re-quantize it as [N, K] = (out_features, in_features)",
                DeprecationWarning,
                stacklevel=2,
            )
        result = torch.nn.functional.linear(A, dequantize_weight(B, quant_state, A.dtype).t(), bias)
        return out.copy_(result) if out is not None else result

    needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return MatMul4Bit.apply(A, B, out, bias, quant_state)

    if A.numel() <= GEMV_MAX_ROWS * K:
        # Decoding and small batches: the fused dequantize-and-multiply op (W never written out).
        kernel_bias = _kernel_bias(bias, A, quant_state)
        launch = _prepared_gemv(A, B, quant_state, kernel_bias)
        if launch is not None:
            result = _launch_with_bias(launch, A, bias)
            if out is None:
                _keep_plan(A, B, bias, quant_state, launch)
        else:
            result = F.gemv_4bit(A, B.reshape(-1), state=quant_state)
            if bias is not None:
                result = result + bias
    else:
        result = _dequantize_and_multiply(A, B, quant_state, bias)
    return out.copy_(result) if out is not None else result
