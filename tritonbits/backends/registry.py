"""Which implementation serves each op: the PyTorch reference or a Triton kernel.

``TRITONBITS_BACKEND`` (read once, when tritonbits is imported) chooses:

- ``auto`` (default): Triton kernels on CUDA/ROCm tensors where Triton is installed, the
  reference everywhere else. If Triton cannot be imported, or a GPU is older than Triton supports
  (compute capability below 7.5), one warning, then the reference.
- ``torch``: the reference everywhere.
- ``triton``: Triton kernels on GPU tensors and, with ``TRITON_INTERPRET=1``, on CPU tensors too
  (how CI runs every kernel without a GPU). Errors are raised, never hidden by a fallback.

Triton itself is imported on the first call of a Triton-backed op, never at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .._ops import REFERENCES, qualname

BACKENDS = ("auto", "torch", "triton")

# op name -> module of tritonbits.backends.triton holding a launcher of the same name and signature.
TRITON_KERNELS: dict[str, str] = {
    "quantize_blockwise": "quant_blockwise",
    "dequantize_blockwise": "quant_blockwise",
    "quantize_4bit": "quant_4bit",
    "dequantize_4bit": "quant_4bit",
    "int8_vectorwise_quant": "int8",
    "int8_vectorwise_dequant": "int8",
    "gemv_4bit": "gemv_4bit",
    "gemv_4bit_nested": "gemv_4bit",
    "optimizer_update_32bit": "optim",
    "optimizer_update_8bit_blockwise": "optim",
    "int8_linear_matmul": "int8_matmul",
    "int8_mm_dequant": "int8_matmul",
    "int8_scaled_mm": "int8_matmul",
    "int8_mixed_linear": "int8_linear",
}


def selected_backend() -> str:
    """The value of TRITONBITS_BACKEND, validated (``auto`` when unset)."""
    value = os.environ.get("TRITONBITS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        warnings.warn(
            f"TRITONBITS_BACKEND={value!r} is not one of {BACKENDS}; using 'auto'.", RuntimeWarning, stacklevel=2
        )
        return "auto"
    return value


def triton_device_types(backend: str) -> tuple[str, ...]:
    """Device types whose tensors go to Triton kernels under ``backend``."""
    if backend == "torch" or importlib.util.find_spec("triton") is None:
        return ()
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("cuda", "cpu")
    return ("cuda",)


def load_triton_launcher(name: str):
    """The Triton launcher of op ``name`` (imports Triton and the kernel module)."""
    module = importlib.import_module(f"tritonbits.backends.triton.{TRITON_KERNELS[name]}")
    return getattr(module, name)


def _first_device(args) -> torch.device | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


# CUDA device index -> whether Triton compiles for its compute capability (filled on first use).
_TRITON_CAPABLE: dict[int, bool] = {}


def triton_serves(device: torch.device | None) -> bool:
    """False for an NVIDIA GPU older than Triton supports (warned once); True otherwise."""
    if device is None or device.type != "cuda" or torch.version.hip is not None:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TRITON_CAPABLE:
        from ..device import MIN_TRITON_CAPABILITY, triton_supports_capability

        capability = torch.cuda.get_device_capability(index)
        _TRITON_CAPABLE[index] = triton_supports_capability(capability)
        if not _TRITON_CAPABLE[index]:
            warnings.warn(
                f"tritonbits: cuda:{index} has compute capability {capability[0]}.{capability[1]}; Triton "
                f"needs {MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]} or newer, so the PyTorch reference "
                "serves this GPU.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _TRITON_CAPABLE[index]


def _lazy_kernel(name: str, strict: bool):
    """A kernel for the dispatcher that loads the Triton launcher on its first call.

    Not strict (``auto``): if Triton cannot be imported, or the GPU is older than Triton
    supports, warn once and use the reference.
    """
    launcher = None

    def kernel(*args, **kwargs):
        nonlocal launcher
        if not strict and not triton_serves(_first_device(args)):
            return REFERENCES[name](*args, **kwargs)
        if launcher is None:
            try:
                launcher = load_triton_launcher(name)
            except ImportError as error:
                if strict:
                    raise
                warnings.warn(
                    f"tritonbits: Triton kernels unavailable ({error}); using the PyTorch reference for "
                    f"{name}. Run `python -m tritonbits` for a diagnosis.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                launcher = REFERENCES[name]
        return launcher(*args, **kwargs)

    kernel.__name__ = f"{name}_triton"
    return kernel


# (op name, device type) -> the Triton kernel registered for it: what the dispatcher runs there.
_REGISTERED: dict[tuple[str, str], object] = {}


def register_triton_kernels(backend: str | None = None) -> tuple[str, ...]:
    """Register each op in TRITON_KERNELS for the device types that ``backend`` sends to Triton."""
    backend = backend or selected_backend()
    device_types = triton_device_types(backend)
    for name in TRITON_KERNELS:
        for device_type in device_types:
            kernel = _lazy_kernel(name, backend == "triton")
            torch.library.register_kernel(qualname(name), device_type, kernel)
            _REGISTERED[(name, device_type)] = kernel
    return device_types


def direct_kernel(name: str, device_type: str):
    """The function the dispatcher runs for op ``name`` on plain tensors of ``device_type``.

    Eager calls on plain tensors may call it directly: going through ``torch.ops`` costs tens of
    microseconds of host time per call, as much as a GPU kernel on a 4096x4096 weight.
    """
    return _REGISTERED.get((name, device_type)) or REFERENCES[name]


def may_skip_dispatch(tensor: torch.Tensor) -> bool:
    """Whether an eager call on ``tensor`` may skip the op's dispatch: False while tracing, under
    dispatch modes (fake tensors, recorders) and for tensor subclasses that dispatch themselves."""
    return not (
        type(tensor).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__
        or torch.compiler.is_compiling()
        or is_in_torch_dispatch_mode()
    )


def triton_module(name: str, tensor: torch.Tensor):
    """The module of tritonbits.backends.triton holding op ``name``'s kernel, for an eager call on
    ``tensor`` that may skip the op and use a launch kept on a quant state
    (``backends/triton/kept_launch.py``); None where the op must be called.

    The op must be called while tracing, under dispatch modes (fake tensors, recorders), for
    tensor subclasses that dispatch themselves (DTensor), and where Triton does not serve the op
    on the tensor's device (not registered there, not importable, GPU too old)."""
    if not may_skip_dispatch(tensor):
        return None
    device = tensor.device
    if (name, device.type) not in _REGISTERED or not triton_serves(device):
        return None
    try:
        return importlib.import_module(f"tritonbits.backends.triton.{TRITON_KERNELS[name]}")
    except ImportError:
        return None  # the registered kernel warns once and uses the reference
