"""Hugging Face integration: transformers quantizer + config, peft-ready layers, quantize_model.

transformers is imported here only, and only when a name that needs it is first used:
``quantize_model`` / ``dequantize_model`` work on plain PyTorch models without transformers.

    import tritonbits.hf
    from tritonbits.hf import TritonBitsConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=TritonBitsConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))

Importing the config registers quant_method "tritonbits" with transformers, which is what lets
a saved tritonbits checkpoint reload: import ``tritonbits.hf`` before ``from_pretrained``.
"""

from __future__ import annotations

import importlib

from .replace import dequantize_model, quantize_model  # noqa: F401

# names that need transformers; all served by the quantizer module, which imports the config, so
# the config and the quantizer are registered with transformers together
_LAZY = (
    "TritonBitsConfig",
    "TritonBitsHfQuantizer",
    "BitsAndBytesCompatQuantizer",
    "enable_bitsandbytes_compat",
    "disable_bitsandbytes_compat",
)

__all__ = ["quantize_model", "dequantize_model", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.quantizer")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
