"""The transformers quantizer: ``from_pretrained(..., quantization_config=TritonBitsConfig(...))``.

Flow (transformers >= 5, whose loader converts one checkpoint tensor at a time):

1. ``_process_model_before_weight_loading``: on the meta skeleton, every ``nn.Linear`` outside
   the skip list (output head, tied weights, ``llm_int8_skip_modules``, fp32 modules, and with
   ``llm_int8_enable_fp32_cpu_offload`` the modules mapped to "cpu"/"disk") becomes an empty
   Linear4bit or Linear8bitLt.
2. Loading a dense checkpoint: each such weight arrives alone, already on its device, and
   :class:`QuantizeWeight` turns it into packed codes before the next one is read; transformers
   loads synchronously when quantizing on the fly, so the peak is the quantized model plus one
   dense tensor.
3. Loading a quantized checkpoint (bitsandbytes' layout, written by ``save_pretrained``): the
   loader groups ``weight`` with ``weight.absmax``, ``weight.quant_map``... (4-bit) or with
   ``SCB``/``weight_format`` (8-bit), and :class:`LoadQuantized4bit` / :class:`LoadQuantized8bit`
   install them as they are: nothing is re-quantized.

Importing this module registers the quantizer as quant_method "tritonbits".
:func:`enable_bitsandbytes_compat` additionally routes ``BitsAndBytesConfig`` and checkpoints
saved with quant_method "bitsandbytes" here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from ..nn.linear8bit import LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING
from .config import QUANT_METHOD, TritonBitsConfig  # noqa: F401  (registers the config too)
from .replace import QuantizeSettings, dequantize_model, replace_with_quantized_linear

__all__ = [
    "TritonBitsHfQuantizer",
    "BitsAndBytesCompatQuantizer",
    "enable_bitsandbytes_compat",
    "disable_bitsandbytes_compat",
]

# bitsandbytes' serialized quant-state keys of one 4-bit weight, relative to the module
_STATE_KEYS_4BIT = [
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_map",
    "weight.absmax",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "weight",
]


def _first(value):
    return value[0] if isinstance(value, list) else value


class QuantizeWeight(ConversionOps):
    """Loader op: a dense weight [N, K] of a Linear4bit/Linear8bitLt -> its quantized parameter."""

    def __init__(self, hf_quantizer: "TritonBitsHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for param_name, value in input_dict.items():
            value = _first(value)
            module, _ = get_module_from_name(model, param_name)
            if isinstance(module, Linear4bit):
                old = module.weight
                weight = Params4bit(
                    value,
                    requires_grad=False,
                    blocksize=old.blocksize,
                    compress_statistics=old.compress_statistics,
                    quant_type=old.quant_type,
                    quant_storage=old.quant_storage,
                    module=module,
                )
                result[param_name] = weight.quantize_(value.device)
            elif module.state.has_fp16_weights:
                result[param_name] = Int8Params(value, requires_grad=False, has_fp16_weights=True)
            else:
                result[param_name] = Int8Params(value, requires_grad=False)._quantize(value.device)
            module._is_hf_initialized = True
        return result


class LoadQuantized4bit(ConversionOps):
    """Loader op: packed 4-bit ``weight`` + its quant-state tensors -> a quantized Params4bit."""

    def __init__(self, hf_quantizer: "TritonBitsHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:  # a dense module's weight, matched by the "weight" pattern only
            return input_dict
        tensors = {key: _first(value) for key, value in input_dict.items()}
        packed = tensors.pop("weight")
        module, _ = get_module_from_name(model, full_layer_name)
        weight = Params4bit.from_prequantized(packed, tensors, requires_grad=False, device=packed.device, module=module)
        module._is_hf_initialized = True
        return {"weight": weight}


class LoadQuantized8bit(ConversionOps):
    """Loader op: int8 ``weight`` [N, K] + float32 ``SCB`` [N] (+ ``weight_format``) -> Int8Params."""

    def __init__(self, hf_quantizer: "TritonBitsHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:
            return input_dict
        tensors = {key: _first(value) for key, value in input_dict.items()}
        weight_format = tensors.get("weight_format")
        if weight_format is not None and int(weight_format) != LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]:
            raise ValueError(
                f"{full_layer_name}: only the row-major weight_format (0) is supported, got {weight_format}"
            )
        codes = tensors["weight"]
        if codes.dtype != torch.int8:
            raise ValueError(f"{full_layer_name}: an 8-bit checkpoint holds int8 weights, got {codes.dtype}")
        scb = tensors["SCB"].to(device=codes.device, dtype=torch.float32)
        module, _ = get_module_from_name(model, full_layer_name)
        module._is_hf_initialized = True
        return {"weight": Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)}


class TritonBitsHfQuantizer(HfQuantizer):
    """Loads and quantizes transformers models with tritonbits' Linear4bit / Linear8bitLt layers.

    Built by transformers from a ``TritonBitsConfig`` (or, after :func:`enable_bitsandbytes_compat`,
    a ``BitsAndBytesConfig``); not meant to be built by hand.
    """

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.settings = QuantizeSettings.from_config(quantization_config)
        self.modules_to_not_convert: list[str] = []

    # -- checks and placement

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if not self.quantization_config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            devices = {str(device) for device in device_map.values()}
            if devices != {"cpu"} and devices & {"cpu", "disk"}:
                raise ValueError(
                    f"device_map puts modules on {sorted(devices)}: with a mix of accelerator and cpu/disk "
                    "placement set llm_int8_enable_fp32_cpu_offload=True (the offloaded modules stay dense)"
                )

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory: dict[str, Any]) -> dict[str, Any]:
        # headroom for the dense tensor being quantized and the kernels' buffers
        return {key: value * 0.90 for key, value in max_memory.items()}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, (Linear4bit, Linear8bitLt)) and name == "weight"

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        """Bytes per weight element once stored, used by device_map="auto" to place modules."""
        if self.param_needs_quantization(model, param_name):
            return 0.5 if self.settings.bits == 4 else 1.0
        return super().param_element_size(model, param_name, param)

    # -- model surgery

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        if self.quantization_config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            self.modules_to_not_convert += [name for name, device in device_map.items() if device in ("cpu", "disk")]
        replace_with_quantized_linear(
            model, self.settings, self.modules_to_not_convert, pre_quantized=self.pre_quantized
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.is_loaded_in_4bit = self.settings.bits == 4
        model.is_loaded_in_8bit = self.settings.bits == 8
        model.is_4bit_serializable = model.is_8bit_serializable = self.is_serializable()
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeWeight(self)

    def get_weight_conversions(self) -> list:
        if not self.pre_quantized:
            return []
        if self.settings.bits == 4:
            return [WeightConverter(source_patterns=list(_STATE_KEYS_4BIT), target_patterns="weight",
                                    operations=[LoadQuantized4bit(self)])]  # fmt: skip
        return [WeightConverter(source_patterns=["SCB", "weight_format", "weight"], target_patterns="weight",
                                operations=[LoadQuantized8bit(self)])]  # fmt: skip

    def get_state_dict_and_metadata(self, model):
        """The state dict ``save_pretrained`` writes: bitsandbytes' layout, no shared code tables.

        Layers quantized in one process share one cached NF4/FP4 ``quant_map`` tensor; safetensors
        refuses tensors that share memory, so each quant-state entry after the first is a copy.
        """
        state_dict = model.state_dict()
        seen: set[tuple[int, int]] = set()
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor) or value.device.type == "meta" or ".weight." not in key:
                continue
            storage = (value.untyped_storage().data_ptr(), value.storage_offset())
            if storage in seen:
                state_dict[key] = value.clone()
            seen.add(storage)
        return state_dict, {}

    def _dequantize(self, model, dtype: Optional[torch.dtype] = None):
        return dequantize_model(model, dtype)

    # -- capabilities

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


class BitsAndBytesCompatQuantizer(TritonBitsHfQuantizer):
    """The same quantizer serving ``BitsAndBytesConfig`` (quant_method "bitsandbytes").

    The model keeps its ``BitsAndBytesConfig``, so ``save_pretrained`` writes a checkpoint that
    bitsandbytes + transformers read back.
    """


_BNB_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
_replaced: dict[str, type] = {}


def enable_bitsandbytes_compat() -> None:
    """Serve transformers' bitsandbytes path with tritonbits, with or without bitsandbytes installed.

    After this call ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` and
    checkpoints whose ``config.json`` says quant_method "bitsandbytes" (4-bit and 8-bit) load
    into tritonbits layers. transformers has no public hook to replace a built-in quantizer
    (``register_quantizer`` refuses known names), so this swaps the two entries of
    ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING``; :func:`disable_bitsandbytes_compat`
    puts the originals back. Calling it twice is harmless.
    """
    for method in _BNB_METHODS:
        current = _auto.AUTO_QUANTIZER_MAPPING.get(method)
        if current is not BitsAndBytesCompatQuantizer:
            _replaced[method] = current
            _auto.AUTO_QUANTIZER_MAPPING[method] = BitsAndBytesCompatQuantizer


def disable_bitsandbytes_compat() -> None:
    """Undo :func:`enable_bitsandbytes_compat`: bitsandbytes configs go to transformers' own quantizers."""
    for method, original in list(_replaced.items()):
        if _auto.AUTO_QUANTIZER_MAPPING.get(method) is BitsAndBytesCompatQuantizer:
            if original is None:
                del _auto.AUTO_QUANTIZER_MAPPING[method]
            else:
                _auto.AUTO_QUANTIZER_MAPPING[method] = original
        del _replaced[method]


_registered = _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
if _registered is not None and _registered.__module__ == __name__:
    del _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]  # this module was imported again
_auto.register_quantizer(QUANT_METHOD)(TritonBitsHfQuantizer)
