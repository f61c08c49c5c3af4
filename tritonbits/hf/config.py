"""TritonBitsConfig: ``BitsAndBytesConfig``'s fields and defaults, under quant_method "tritonbits".

Importing this module registers the config with transformers
(``transformers.quantizers.auto.register_quantization_config``), so a checkpoint saved from a
tritonbits model reloads with ``from_pretrained`` once ``tritonbits.hf`` is imported.

Serialized form (``config.json`` -> ``quantization_config``): every field, dtypes as strings, and
the bit width as ``_load_in_4bit`` / ``_load_in_8bit`` rather than ``load_in_4bit`` /
``load_in_8bit``: transformers sends any dict holding a true ``load_in_4bit``/``load_in_8bit`` to
bitsandbytes whatever its quant_method says, which would hijack the reload.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["TritonBitsConfig", "QUANT_METHOD"]

QUANT_METHOD = "tritonbits"

_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


def _as_dtype(value, name: str, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise ValueError(f"{name} must name a torch dtype such as 'bfloat16', got {value!r}")
    raise TypeError(f"{name} must be a torch.dtype or a string, got {type(value).__name__}")


class TritonBitsConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` (or :func:`tritonbits.quantize_model`) quantizes linear layers.

    Same arguments and defaults as ``transformers.BitsAndBytesConfig``:

    Args:
        load_in_8bit: LLM.int8(): Linear8bitLt layers (int8 rows, float32 row scales).
        load_in_4bit: Linear4bit layers (NF4/FP4 codes in blocks of 64).
        llm_int8_threshold: 8-bit outlier threshold on |activation| (6.0).
        llm_int8_skip_modules: module names kept dense (default: the output head / tied weights,
            as transformers finds them).
        llm_int8_enable_fp32_cpu_offload: allow modules on "cpu"/"disk" in a mixed device_map;
            they stay dense.
        llm_int8_has_fp16_weight: 8-bit layers keep a trainable float weight.
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul (default float32).
        bnb_4bit_quant_type: "fp4" (default) or "nf4".
        bnb_4bit_use_double_quant: quantize the absmax scales again (8 bits, blocks of 256).
        bnb_4bit_quant_storage: dtype of the words holding packed 4-bit codes (default uint8).
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules=None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype=None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage=None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        # the serialized names (see the module docstring) are accepted back
        load_in_8bit = kwargs.pop("_load_in_8bit", load_in_8bit)
        load_in_4bit = kwargs.pop("_load_in_4bit", load_in_4bit)
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"TritonBitsConfig got unexpected arguments {sorted(kwargs)}")
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_compute_dtype = _as_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        if isinstance(bnb_4bit_quant_storage, str) and bnb_4bit_quant_storage not in _STORAGE_DTYPES:
            raise ValueError(f"bnb_4bit_quant_storage must be one of {_STORAGE_DTYPES}, got {bnb_4bit_quant_storage!r}")
        self.bnb_4bit_quant_storage = _as_dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", torch.uint8)
        self.post_init()

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"load_in_4bit must be a bool, got {type(value).__name__}")
        if value and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True")
        self._load_in_4bit = value

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"load_in_8bit must be a bool, got {type(value).__name__}")
        if value and self.load_in_4bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True")
        self._load_in_8bit = value

    def post_init(self) -> None:
        """Check every field's type and value (TypeError / ValueError naming the field)."""
        for name in ("_load_in_4bit", "_load_in_8bit", "llm_int8_enable_fp32_cpu_offload",
                     "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name.lstrip('_')} must be a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.llm_int8_threshold, int) and not isinstance(self.llm_int8_threshold, bool):
            self.llm_int8_threshold = float(self.llm_int8_threshold)
        if not isinstance(self.llm_int8_threshold, float):
            raise TypeError(f"llm_int8_threshold must be a float, got {type(self.llm_int8_threshold).__name__}")
        if self.llm_int8_skip_modules is not None and not isinstance(self.llm_int8_skip_modules, list):
            raise TypeError(
                f"llm_int8_skip_modules must be a list of module names, got {type(self.llm_int8_skip_modules).__name__}"
            )
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {self.bnb_4bit_quant_type!r}")

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self):
        """"llm_int8", "fp4", "nf4" or None, as ``BitsAndBytesConfig.quantization_method``."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict[str, Any]:
        output = copy.deepcopy(self.__dict__)
        output["bnb_4bit_compute_dtype"] = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        output["bnb_4bit_quant_storage"] = str(self.bnb_4bit_quant_storage).removeprefix("torch.")
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        defaults = TritonBitsConfig().to_dict()
        output = self.to_dict()
        # quant_method and the bit width always stay: they say how to reload
        keep = {"quant_method", "_load_in_4bit", "_load_in_8bit"}
        return {key: value for key, value in output.items() if key in keep or value != defaults.get(key)}


_registered = AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
if _registered is not None and _registered.__module__ == __name__:
    # this module was imported again (importlib.reload): replace our own earlier class
    del AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
register_quantization_config(QUANT_METHOD)(TritonBitsConfig)
