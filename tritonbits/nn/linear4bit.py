"""4-bit linear layers (QLoRA): Linear4bit and its NF4/FP4 shorthands LinearNF4, LinearFP4.

Usage is bitsandbytes': build the layer (or load a dense ``nn.Linear`` state dict into it), then
move it to a device, which quantizes the weight::

    layer = Linear4bit(4096, 4096, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cuda")          # or .cpu() / .quantize_() to quantize where it is

``state_dict()`` is bitsandbytes' format, and loading such a state dict works on a freshly built
(dense) layer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..autograd.matmul_4bit import matmul_4bit, planned_matmul_4bit
from .compiled_decode import compiled_gemv, keep_decode_pack, refresh_decode_pack
from .params4bit import Params4bit, load_prequantized_weight, quantized_weight, save_quant_state

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4"]


class Linear4bit(nn.Linear):
    """``y = x @ W.T + b`` with W stored as 4-bit NF4/FP4 codes (frozen) and b in full precision.

    Args:
        input_features: K, the size of the last input dimension.
        output_features: N, the size of the last output dimension.
        bias: whether to learn an additive bias [N].
        compute_dtype: dtype of the matmul. None: the first input's dtype if it is float32 or
            bfloat16 (then kept), float16 inputs compute in float16 with a warning about it.
        compress_statistics: double quantization of the absmax scales (8-bit, blocks of 256).
        quant_type: ``"fp4"`` (default) or ``"nf4"``.
        quant_storage: dtype of the words holding the packed codes (see Params4bit).
        device: where the dense weight is first allocated (it is quantized on ``.to``).

    Input [..., K] in any float dtype; output [..., N] in the input's dtype.
    """

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_type="fp4",
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage

    def quantize_(self) -> "Linear4bit":
        """Quantize the weight where it is (e.g. on the CPU); no-op if already quantized."""
        self.weight.quantize_()
        refresh_decode_pack(self)
        return self

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.cpu() quantize or move the weight's QuantState: rebuild the decode pack there
        result = super()._apply(fn, recurse)
        refresh_decode_pack(self)
        return result

    def __setstate__(self, state):
        # a copied or unpickled weight holds a new QuantState (with a new stamp): pack that one
        super().__setstate__(state)
        refresh_decode_pack(self)

    def set_compute_type(self, x: torch.Tensor) -> None:
        """Adopt float32/bfloat16 input dtypes as compute dtype (bitsandbytes' rule, first call)."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            if not torch.compiler.is_compiling():
                warnings.warn(
                    "Input type into Linear4bit is torch.float16, but compute_dtype is float32 or unset: "
                    "computing in float16. Set compute_dtype=torch.float16 to silence this.",
                    stacklevel=3,
                )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed), bias
        save_quant_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        state_dict, installed = load_prequantized_weight(self, state_dict, prefix)
        missing_before = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if installed and prefix + "weight" in missing_keys[missing_before:]:
            missing_keys.remove(prefix + "weight")
        refresh_decode_pack(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = quantized_weight(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if torch.compiler.is_compiling():
            out = compiled_gemv(self, x, weight, bias)  # decode sizes, traced: few guards
        else:
            keep_decode_pack(self, weight.quant_state)  # one comparison unless the state changed
            out = planned_matmul_4bit(x, weight, weight.quant_state, bias)  # the eager decode path
        if out is None:
            out = matmul_4bit(x, weight, weight.quant_state, bias=bias)
        return out.to(input_dtype)


class LinearFP4(Linear4bit):
    """Linear4bit with ``quant_type="fp4"``."""

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device
        )


class LinearNF4(Linear4bit):
    """Linear4bit with ``quant_type="nf4"`` (the 4-bit NormalFloat of QLoRA)."""

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device
        )
