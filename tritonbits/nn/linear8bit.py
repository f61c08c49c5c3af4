"""LLM.int8() linear layer: ``Int8Params`` (the weight) and ``Linear8bitLt``.

Formats are bitsandbytes 0.50.2's. A quantized weight is int8 [out_features, in_features] rows
``CB`` with float32 row absmax ``SCB`` [out_features] (``W ~= CB * SCB[:, None] / 127``). A
quantized module's state dict holds ``weight`` (int8), ``bias``, ``SCB`` and ``weight_format``
(uint8 scalar 0 = row-major, the only layout written or read).

Quantization happens where bitsandbytes does it: when a float weight on the CPU is moved to any
device (``.to(device)``, ``.cuda()``, and ``.to("cpu")``), or in the first forward of a module
with ``has_fp16_weights=False`` that was never moved. Unlike bitsandbytes, a quantized checkpoint
also loads into a freshly built module without moving it first, and ``SCB`` loads with
``strict=False`` and after a forward.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..autograd.matmul_8bit import MatmulLtState, matmul, planned_inference_forward
from ._compile import mark_static

__all__ = ["Int8Params", "Linear8bitLt", "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING"]

# bitsandbytes' weight_format codes; only "row" survives, the others name dropped GPU tile layouts.
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
_FORMAT_NAMES = {code: name for name, code in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}


class Int8Params(torch.nn.Parameter):
    """A weight that turns into int8 rows ``CB`` plus float32 row scales ``SCB`` when moved.

    Args:
        data: the float weight [out_features, in_features] (or an int8 one with CB/SCB given).
        requires_grad: as for ``nn.Parameter``.
        has_fp16_weights: if True, never quantize (the float weight is trained; LLM.int8()
            quantizes it on the fly in each forward).
        CB, SCB: int8 [N, K] rows and float32 [N] row absmax of an already quantized weight.
    """

    def __new__(
        cls,
        data: Optional[Tensor] = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Optional[Tensor] = None,
        SCB: Optional[Tensor] = None,
        **kwargs,
    ):
        if data is None:
            data = torch.empty(0)
        param = torch.Tensor._make_subclass(cls, data, requires_grad)
        param.CB = CB
        param.SCB = SCB
        param.has_fp16_weights = has_fp16_weights
        return param

    def _quantize(self, device) -> "Int8Params":
        if self.has_fp16_weights:
            return super().to(device)
        weight = self.data.contiguous().to(device=device, dtype=torch.float16)
        CB, SCB, _ = F.int8_vectorwise_quant(weight)
        self.data = CB
        self.CB = CB
        self.SCB = SCB
        mark_static(SCB)
        return self

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def xpu(self, device=None, non_blocking: bool = False):
        return self.to(device="xpu" if device is None else device, non_blocking=non_blocking)

    def __deepcopy__(self, memo):
        return type(self)(
            data=copy.deepcopy(self.data, memo),
            requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
            CB=copy.deepcopy(self.CB, memo),
            SCB=copy.deepcopy(self.SCB, memo),
        )

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        is_quantized = self.data.dtype == torch.int8

        # bitsandbytes' rule: a float weight leaving (or staying on) the CPU for a real device
        # is quantized; meta moves and dtype-only casts are not.
        if not is_quantized and device is not None and device.type != "meta" and self.data.device.type == "cpu":
            return self._quantize(device)

        moved = Int8Params(
            super().to(device=device, dtype=dtype, non_blocking=non_blocking),
            requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
        )
        if is_quantized:
            moved.CB = moved.data
            if device is not None and self.SCB is not None and self.SCB.device.type != "meta":
                moved.SCB = self.SCB.to(device)
                mark_static(moved.SCB)
        return moved


def _check_weight_format(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: drop ``weight_format`` from the checkpoint after checking it says row-major."""
    if state_dict.get(f"{prefix}weight") is None:
        return  # e.g. an adapter-only checkpoint
    weight_format = state_dict.pop(f"{prefix}weight_format", "row")
    if isinstance(weight_format, Tensor):
        weight_format = weight_format.item()
    if isinstance(weight_format, int):
        if weight_format not in _FORMAT_NAMES:
            raise ValueError(f"Expected supported weight format - got {weight_format}")
        weight_format = _FORMAT_NAMES[weight_format]
    if weight_format != "row":
        raise ValueError(f"Only 'row' weight format is supported, got {weight_format}")


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether a and b view the same bytes the same way (then ``a.data = b`` would change nothing)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())  # fmt: skip


class Linear8bitLt(nn.Linear):
    """``nn.Linear`` computed with LLM.int8() (bitsandbytes' ``Linear8bitLt``).

    Args:
        input_features: K, the input width.
        output_features: N, the output width.
        bias: whether to learn a bias [N].
        has_fp16_weights: True (default): keep the float weight and train it, quantizing it in
            every forward. False: inference; the weight is quantized once (on ``.to(device)`` or
            in the first forward) and stored as int8 + SCB.
        threshold: outlier threshold on |activation|; input columns holding a larger value are
            multiplied in 16-bit (0.0 = off, everything in int8; 6.0 is the paper's value).
        index: kept for compatibility (bitsandbytes stores it and does not use it).
        device: where to allocate the float weight.

    Input [..., K] (float16 preferred; bf16/fp32 are cast to float16 for quantization),
    output [..., N] in the input's dtype. The bias is cast to the input's dtype in place.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index=None,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.state = MatmulLtState()
        self.index = index
        self.state.threshold = threshold
        self.state.has_fp16_weights = has_fp16_weights
        if threshold > 0.0 and not has_fp16_weights:
            self.state.use_pool = True
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights)
        self._register_load_state_dict_pre_hook(_check_weight_format)

    def _current_scb(self) -> Optional[Tensor]:
        """The row scales wherever they live: on the weight until the first forward, then in state."""
        weight_scb = getattr(self.weight, "SCB", None)
        return weight_scb if weight_scb is not None else self.state.SCB

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        scb = self._current_scb()
        if not self.state.has_fp16_weights and scb is not None:
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            row_major = LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
            destination[prefix + "weight_format"] = torch.tensor(row_major, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        scb_key = prefix + "SCB"
        incoming_scb = state_dict.get(scb_key)
        incoming_weight = state_dict.get(prefix + "weight")
        quantized_checkpoint = (
            incoming_scb is not None and isinstance(incoming_weight, Tensor) and incoming_weight.dtype == torch.int8
        )
        if quantized_checkpoint and self.state.has_fp16_weights:
            raise RuntimeError(
                f"{prefix}weight is an int8 checkpoint; build Linear8bitLt with has_fp16_weights=False to load it"
            )
        if quantized_checkpoint and self.weight.dtype != torch.int8:
            # Make the weight int8 of the checkpoint's shape so that the generic loader copies
            # the codes verbatim instead of casting them into the float weight.
            self.weight.data = torch.empty(incoming_weight.shape, dtype=torch.int8, device=self.weight.device)
            self.weight.CB, self.weight.SCB = None, None
            self.state.reset_grads()

        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if scb_key in unexpected_keys:
            unexpected_keys.remove(scb_key)
        if not isinstance(self.weight, Int8Params):
            # load_state_dict(assign=True) put a plain Parameter in place.
            self.weight = Int8Params(
                self.weight.data, requires_grad=self.weight.requires_grad, has_fp16_weights=self.state.has_fp16_weights
            )
        if incoming_scb is None:
            return
        if self.weight.dtype != torch.int8:
            error_msgs.append(f"{scb_key} was given but {prefix}weight is not int8 (dtype {self.weight.dtype})")
            return

        scb = self._current_scb()
        if scb is not None and scb.shape == incoming_scb.shape and scb.device.type != "meta":
            scb.copy_(incoming_scb)
        else:
            scb = incoming_scb.detach().to(device=self.weight.device, dtype=torch.float32, copy=True)
            mark_static(scb)
        if self.state.CB is not None:
            # A forward already moved the quantized weight into state; keep it there.
            self.state.CB, self.state.SCB = self.weight.data, scb
            self.weight.CB, self.weight.SCB = None, None
        else:
            self.weight.CB, self.weight.SCB = self.weight.data, scb

    def init_8bit_state(self) -> None:
        """Move CB/SCB from the weight into ``self.state`` (done by the first forward)."""
        self.state.CB = self.weight.CB
        self.state.SCB = self.weight.SCB
        self.weight.CB = None
        self.weight.SCB = None

    def _apply(self, fn, *args, **kwargs):
        # Module.to/.cuda/.half replace weight.data only; re-point CB at the moved codes and move
        # the scales with them (bitsandbytes leaves weight.CB/SCB behind on the old device).
        super()._apply(fn, *args, **kwargs)
        weight, state = self.weight, self.state
        device = weight.device
        if weight.dtype == torch.int8:
            if getattr(weight, "CB", None) is not None:
                weight.CB = weight.data
            if state.CB is not None:
                state.CB = weight.data
        elif state.CB is not None:
            state.CB = state.CB.to(device)
        if getattr(weight, "SCB", None) is not None:
            weight.SCB = weight.SCB.to(device)
        if state.SCB is not None:
            state.SCB = state.SCB.to(device)
        mark_static(getattr(weight, "SCB", None), state.SCB)
        return self

    def forward(self, x: Tensor) -> Tensor:
        self.state.is_training = self.training
        out = planned_inference_forward(x, self.weight, self.bias, self.state)
        if out is not None:  # the eager decode path: the last call's kernels, nothing changed
            return out
        if self.weight.CB is not None:
            self.init_8bit_state()
        # Int8Params never changes dtype with the input; the bias must follow it.
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        out = matmul(x, self.weight, bias=self.bias, state=self.state)
        CB = self.state.CB
        # (Traced, the weight is left alone: it already holds CB unless a requantization, which
        # only has_fp16_weights=True does, replaced it.)
        if (not self.state.has_fp16_weights and CB is not None and not torch.compiler.is_compiling()
                and not _same_tensor(self.weight, CB)):  # fmt: skip
            self.weight.data = CB
        return out
