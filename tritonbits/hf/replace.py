"""Swap ``nn.Linear`` layers for tritonbits' 4-bit / 8-bit layers and back; no transformers needed.

Three entry points:

- :func:`quantize_model` quantizes a plain PyTorch model that already holds its float weights,
  one layer at a time (the dense weight of a layer is dropped as soon as its codes exist, so the
  peak extra memory is one layer), with a tqdm progress bar when tqdm is installed.
- :func:`replace_with_quantized_linear` builds empty quantized layers in place of ``nn.Linear``
  on a "meta" model skeleton; the Hugging Face quantizer fills them while loading a checkpoint.
- :func:`dequantize_model` turns quantized layers back into ``nn.Linear`` holding the decoded
  weights, e.g. to merge LoRA adapters into a dense copy.

Settings are read from any object with ``BitsAndBytesConfig``'s attribute names
(``TritonBitsConfig``, ``BitsAndBytesConfig``, a ``dict`` or keyword arguments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

__all__ = ["QuantizeSettings", "quantize_model", "replace_with_quantized_linear", "dequantize_model", "should_convert"]

_QUANT_TYPES = ("fp4", "nf4")


@dataclass
class QuantizeSettings:
    """The subset of ``BitsAndBytesConfig`` that decides how a linear layer is quantized."""

    bits: int
    llm_int8_threshold: float = 6.0
    llm_int8_has_fp16_weight: bool = False
    llm_int8_skip_modules: Optional[list[str]] = None
    bnb_4bit_compute_dtype: Optional[torch.dtype] = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype = torch.uint8

    @classmethod
    def from_config(cls, config: Any = None, **overrides) -> "QuantizeSettings":
        """Read a TritonBitsConfig / BitsAndBytesConfig / dict (plus keyword overrides)."""
        if config is None:
            values: dict[str, Any] = {}
        elif isinstance(config, dict):
            values = dict(config)
        else:
            names = (
                "load_in_4bit", "load_in_8bit", "llm_int8_threshold", "llm_int8_has_fp16_weight",
                "llm_int8_skip_modules", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
            )  # fmt: skip
            values = {name: getattr(config, name) for name in names if hasattr(config, name)}
        values.update(overrides)
        load_in_4bit = bool(values.pop("load_in_4bit", False))
        load_in_8bit = bool(values.pop("load_in_8bit", False))
        if load_in_4bit == load_in_8bit:
            raise ValueError(
                "exactly one of load_in_4bit and load_in_8bit must be True, got "
                f"load_in_4bit={load_in_4bit}, load_in_8bit={load_in_8bit}"
            )
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown quantization settings {sorted(unknown)}")
        settings = cls(bits=4 if load_in_4bit else 8, **values)
        if settings.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {settings.bnb_4bit_quant_type!r}")
        for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            value = getattr(settings, name)
            if isinstance(value, str):
                setattr(settings, name, getattr(torch, value))
        if settings.bnb_4bit_quant_storage is None:
            settings.bnb_4bit_quant_storage = torch.uint8
        return settings


def should_convert(name: str, modules_to_not_convert: Optional[Iterable[str]]) -> bool:
    """False if module ``name`` is listed in ``modules_to_not_convert`` (or lies inside one).

    A key matches a module whose dotted name equals it, ends with ``"." + key``, or starts with
    ``key + "."`` (a parent); keys are plain names, as in ``llm_int8_skip_modules``.
    """
    for key in modules_to_not_convert or ():
        if name == key or name.endswith("." + key) or name.startswith(key + ".") or ("." + key + ".") in name:
            return False
        # transformers also lets a key be a regular expression anchored at the start
        try:
            if re.match(key + r"(\.|$)", name):
                return False
        except re.error:
            pass
    return True


def _linear_targets(model: nn.Module, modules_to_not_convert) -> list[tuple[str, nn.Linear]]:
    # exact type: subclasses (our own Linear4bit/Linear8bitLt, LoRA wrappers) are not plain layers
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and should_convert(name, modules_to_not_convert)
    ]


def _empty_quantized_linear(linear: nn.Linear, settings: QuantizeSettings, pre_quantized: bool) -> nn.Module:
    """A tritonbits layer with the shape of ``linear``, weight on "meta" (filled when loading)."""
    from ..nn import Linear4bit, Linear8bitLt

    bias = linear.bias is not None
    with torch.device("meta"):
        if settings.bits == 4:
            layer = Linear4bit(
                linear.in_features,
                linear.out_features,
                bias,
                settings.bnb_4bit_compute_dtype,
                compress_statistics=settings.bnb_4bit_use_double_quant,
                quant_type=settings.bnb_4bit_quant_type,
                quant_storage=settings.bnb_4bit_quant_storage,
            )
            if pre_quantized:
                # the checkpoint holds packed words; a float meta weight would make the loader cast them
                layer.weight.data = layer.weight.data.to(settings.bnb_4bit_quant_storage)
        else:
            layer = Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias,
                has_fp16_weights=settings.llm_int8_has_fp16_weight,
                threshold=settings.llm_int8_threshold,
            )
            if pre_quantized:
                layer.weight.data = layer.weight.data.to(torch.int8)
    if bias:
        layer.bias = nn.Parameter(layer.bias.data.to(linear.bias.dtype), requires_grad=linear.bias.requires_grad)
    layer.requires_grad_(False)
    return layer


def replace_with_quantized_linear(
    model: nn.Module,
    settings: QuantizeSettings,
    modules_to_not_convert: Optional[Iterable[str]] = None,
    pre_quantized: bool = False,
) -> list[str]:
    """Put empty (meta) Linear4bit / Linear8bitLt layers in place of every ``nn.Linear``.

    Meant for a model skeleton on the "meta" device whose weights are loaded afterwards.
    Returns the dotted names of the replaced modules.
    """
    replaced = []
    for name, linear in _linear_targets(model, modules_to_not_convert):
        model.set_submodule(name, _empty_quantized_linear(linear, settings, pre_quantized))
        replaced.append(name)
    return replaced


def quantize_linear(linear: nn.Linear, settings: QuantizeSettings, device=None) -> nn.Module:
    """A quantized copy of ``linear`` on ``device`` (default: where its weight is).

    4-bit: Linear4bit holding NF4/FP4 codes (blocks of 64). 8-bit: Linear8bitLt holding int8
    rows + float32 row scales, or the float weight when ``llm_int8_has_fp16_weight``.
    """
    from ..nn import Int8Params, Params4bit

    device = torch.device(device) if device is not None else linear.weight.device
    layer = _empty_quantized_linear(linear, settings, pre_quantized=False)
    dense = linear.weight.detach()
    if settings.bits == 4:
        layer.weight = Params4bit(
            dense,
            requires_grad=False,
            compress_statistics=settings.bnb_4bit_use_double_quant,
            quant_type=settings.bnb_4bit_quant_type,
            quant_storage=settings.bnb_4bit_quant_storage,
            module=layer,
        )
        layer.weight.quantize_(device)
    else:
        fp16_weights = settings.llm_int8_has_fp16_weight
        weight = Int8Params(dense, requires_grad=fp16_weights, has_fp16_weights=fp16_weights)
        layer.weight = weight._quantize(device) if not fp16_weights else Int8Params(
            dense.to(device), requires_grad=True, has_fp16_weights=True
        )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer


def _progress(items: list, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return items
    return tqdm(items, desc=desc, unit="layer")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: Any = None,
    *,
    modules_to_not_convert: Optional[Iterable[str]] = None,
    device=None,
    progress: bool = True,
    **settings,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of a plain PyTorch ``model`` in place, layer by layer.

    Args:
        model: a model holding real (not "meta") float weights.
        config: ``TritonBitsConfig``, ``BitsAndBytesConfig`` or a dict with their field names;
            keyword ``settings`` (``load_in_4bit=True, bnb_4bit_quant_type="nf4"``...) override it.
        modules_to_not_convert: module names kept dense; ``llm_int8_skip_modules`` of the config
            is added. Defaults to ``["lm_head"]`` when neither is given (a given list replaces
            the default, as in transformers; pass ``[]`` to quantize every linear layer).
        device: where the quantized layers go (default: where each weight is). Quantizing on a GPU
            while the model sits on the CPU keeps only one dense layer at a time on the GPU.
        progress: show a tqdm bar (if tqdm is installed).

    Returns ``model`` (modified in place); each replaced layer is a Linear4bit or Linear8bitLt.
    """
    quantize_settings = QuantizeSettings.from_config(config, **settings)
    skip = list(modules_to_not_convert or [])
    skip += list(quantize_settings.llm_int8_skip_modules or [])
    if modules_to_not_convert is None and not quantize_settings.llm_int8_skip_modules:
        skip = ["lm_head"]
    # Names only: holding the modules in a list would keep every dense weight alive until the end.
    names = [name for name, _ in _linear_targets(model, skip)]
    for name in _progress(names, f"Quantizing to {quantize_settings.bits} bits", progress):
        linear = model.get_submodule(name)
        if linear.weight.device.type == "meta":
            raise ValueError(f"{name} has no weights (it is on the meta device); load them before quantize_model")
        model.set_submodule(name, quantize_linear(linear, quantize_settings, device))
        del linear  # the dense weight is freed here unless the caller holds it
    model.is_quantized = True
    model.is_loaded_in_4bit = quantize_settings.bits == 4
    model.is_loaded_in_8bit = quantize_settings.bits == 8
    return model


def dequantized_linear(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """An ``nn.Linear`` holding the decoded weight of a Linear4bit / Linear8bitLt (or ``layer`` itself)."""
    from .. import functional as F
    from ..nn import Linear4bit, Linear8bitLt
    from ..nn.params4bit import quantized_weight

    if isinstance(layer, Linear4bit):
        weight = quantized_weight(layer)
        dense = F.dequantize_4bit(weight.data, weight.quant_state)
    elif isinstance(layer, Linear8bitLt):
        if layer.weight.dtype == torch.int8:
            scb = layer._current_scb()
            dense = F.int8_vectorwise_dequant(layer.weight.data, scb)
        else:
            dense = layer.weight.data
    else:
        return layer
    if dtype is not None:
        dense = dense.to(dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(dense, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.data.to(dense.dtype), requires_grad=False)
    return linear


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every Linear4bit / Linear8bitLt in ``model`` by an ``nn.Linear`` with decoded weights.

    Works inside wrappers such as peft's LoRA layers (their ``base_layer`` is replaced), so
    ``merge_and_unload()`` can merge adapters into the dense copy afterwards. ``dtype``: of the
    decoded weights (default: the dtype of the model's other float parameters, so the layers fit
    what surrounds them, e.g. float32 after peft's ``prepare_model_for_kbit_training``).
    Returns ``model`` (modified in place) with the quantization flags cleared.
    """
    from ..nn import Linear4bit, Linear8bitLt

    names = [name for name, module in model.named_modules() if isinstance(module, (Linear4bit, Linear8bitLt))]
    dense_dtype = dtype
    if dense_dtype is None:
        # int8 rows do not record a float dtype, and a 4-bit state records the dtype at load time,
        # which peft's preparation may since have changed for the rest of the model
        quantized = {id(p) for name in names for p in model.get_submodule(name).parameters()}
        dense_dtype = next(
            (p.dtype for p in model.parameters() if id(p) not in quantized and p.is_floating_point()), None
        )
    for name in names:
        layer = model.get_submodule(name)
        model.set_submodule(name, dequantized_linear(layer, dense_dtype))
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model
