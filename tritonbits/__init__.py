"""tritonbits: k-bit quantization for PyTorch in pure Python (Triton kernels + PyTorch reference).

``import tritonbits as bnb`` serves code written for bitsandbytes: same public names, signatures,
defaults and serialized formats. Importing is light and never touches the GPU: Triton, the layers,
the optimizers and the Hugging Face glue load on first use.
"""

from __future__ import annotations

import importlib

from . import _ops, functional, utils  # noqa: F401
from .backends import registry as _registry
from .backends import torch as _reference  # noqa: F401  (registers the PyTorch references)

__version__ = "0.1.0"

# bitsandbytes' feature flags, kept for code that inspects them.
features = {"multi_backend"}
supported_torch_devices = {"cpu", "cuda", "xpu", "hpu", "npu", "mps"}

_registry.register_triton_kernels()

_LAZY_SUBMODULES = {"nn", "optim", "hf", "autograd", "device", "diagnostics", "codebooks"}
_LAZY_ATTRIBUTES = {
    "matmul": "autograd",
    "matmul_4bit": "autograd",
    "MatmulLtState": "autograd",
    "quantize_model": "hf",
}


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f"{__name__}.{_LAZY_ATTRIBUTES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
