"""What devices exist, asked of PyTorch only; nothing here raises and nothing runs at import.

bitsandbytes once counted GPUs by opening ``libcuda.so`` through ctypes. In NVIDIA NGC
containers ``cuDeviceGetCount`` returned error 304 (CUDA_ERROR_OPERATING_SYSTEM) although
PyTorch itself worked, and the library fell back to CPU with confusing warnings. tritonbits
asks PyTorch (``torch.cuda.*``, ``torch.version``) and nothing else, so it sees exactly the
GPUs that PyTorch can use.

Every query is wrapped: an exception, or a warning PyTorch raises while initializing CUDA
(it reports a too-old driver or error 304 as a ``UserWarning`` and answers "no GPU"), becomes a
:class:`Problem` with the error text and a plain-language hint. Library code calls
:func:`cuda_devices`, which warns once per distinct problem and returns what could be learned;
ops on CPU tensors never depend on any of this.

Importing this module queries nothing and does not initialize CUDA.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = [
    "MIN_TRITON_CAPABILITY",
    "GpuInfo",
    "Problem",
    "CudaProbe",
    "probe_cuda",
    "cuda_devices",
    "cuda_available",
    "triton_version",
    "triton_import_error",
    "triton_available",
    "triton_supports_capability",
    "hint_for_error",
    "warn_once",
]

# Triton 3.x generates code for NVIDIA GPUs from Turing (sm_75) on; its README lists 8.0+ as
# supported, and 7.5 (T4, free Colab) works in practice. Older GPUs get the PyTorch reference.
MIN_TRITON_CAPABILITY = (7, 5)

_GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as PyTorch sees it.

    Attributes:
        index: torch device index (``cuda:<index>``), after CUDA_VISIBLE_DEVICES.
        name: marketing name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        capability: (major, minor) compute capability; on ROCm PyTorch's gfx major/minor.
        total_memory: bytes of device memory.
        multi_processor_count: streaming multiprocessors (CUDA) or compute units (ROCm).
        arch: ``"sm_90"`` on CUDA, the gfx name (``"gfx942:sramecc+:xnack-"``) on ROCm.
    """

    index: int
    name: str
    capability: tuple[int, int]
    total_memory: int
    multi_processor_count: int
    arch: str

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def total_memory_gib(self) -> float:
        return self.total_memory / _GIB

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "index": self.index,
            "name": self.name,
            "capability": list(self.capability),
            "arch": self.arch,
            "total_memory_bytes": self.total_memory,
            "total_memory_gib": round(self.total_memory_gib, 2),
            "multi_processor_count": self.multi_processor_count,
        }


@dataclass(frozen=True)
class Problem:
    """A query that failed or warned: which one, the error text, and what to try."""

    query: str
    error: str
    hint: str

    def as_dict(self) -> dict:
        return {"query": self.query, "error": self.error, "hint": self.hint}


@dataclass
class CudaProbe:
    """Everything PyTorch says about its GPUs.

    Attributes:
        built_for_cuda: ``torch.version.cuda`` (e.g. ``"12.4"``) or None for non-CUDA builds.
        built_for_hip: ``torch.version.hip`` or None.
        available: ``torch.cuda.is_available()``; False when the query failed.
        count: ``torch.cuda.device_count()``; 0 when the query failed.
        devices: one :class:`GpuInfo` per GPU whose properties could be read.
        problems: one :class:`Problem` per failed or warning query, in query order.
    """

    built_for_cuda: Optional[str] = None
    built_for_hip: Optional[str] = None
    available: bool = False
    count: int = 0
    devices: list[GpuInfo] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def backend_name(self) -> str:
        """``"ROCm"`` for HIP builds of PyTorch, ``"CUDA"`` otherwise."""
        return "ROCm" if self.built_for_hip else "CUDA"

    def no_gpu_reason(self) -> Optional[str]:
        """Why no GPU is usable, in one sentence; None when at least one GPU was found."""
        if self.devices:
            return None
        if self.problems:
            return f"PyTorch could not query its GPUs ({self.problems[0].error})"
        if not self.built_for_cuda and not self.built_for_hip:
            return f"this PyTorch build ({torch.__version__}) has no CUDA or ROCm support"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
        return f"PyTorch (built for {self.backend_name} {self.built_for_cuda or self.built_for_hip}) sees no GPU"

    def as_dict(self) -> dict:
        return {
            "built_for_cuda": self.built_for_cuda,
            "built_for_hip": self.built_for_hip,
            "available": self.available,
            "count": self.count,
            "devices": [gpu.as_dict() for gpu in self.devices],
            "no_gpu_reason": self.no_gpu_reason(),
            "problems": [problem.as_dict() for problem in self.problems],
        }


# ---------------------------------------------------------------------------------------------
# hints for the failure modes users meet


_CONTAINER_HINT = (
    "CUDA error 304 (CUDA_ERROR_OPERATING_SYSTEM) usually means a container without proper GPU "
    "access: start it with `--gpus all` (NVIDIA Container Toolkit installed on the host), check that "
    "`nvidia-smi` works inside it, and that the container's driver libraries (libcuda.so) match the "
    "host's kernel driver. tritonbits keeps working on CPU tensors meanwhile."
)
_DRIVER_TOO_OLD_HINT = (
    "The NVIDIA driver is older than the CUDA {cuda} this PyTorch was built for. Update the driver "
    "(`nvidia-smi` shows its version and the newest CUDA it supports), or install a PyTorch build for "
    "an older CUDA (https://pytorch.org/get-started/locally/). tritonbits has no binaries of its own, "
    "so it works with whichever CUDA your PyTorch uses."
)
_NO_DRIVER_HINT = (
    "No NVIDIA driver was found. On a GPU machine install the driver and check `nvidia-smi`; in a "
    "container start it with `--gpus all` (NVIDIA Container Toolkit). tritonbits runs on CPU meanwhile."
)
_NO_DEVICE_HINT = (
    "No GPU is visible. Check `nvidia-smi`, that CUDA_VISIBLE_DEVICES (if set) names existing GPUs, "
    "and in a container that it was started with `--gpus all`. tritonbits runs on CPU meanwhile."
)
_GENERIC_CUDA_HINT = (
    "PyTorch could not talk to the GPU. Check that `python -c \"import torch; print(torch.cuda.is_available())\"` "
    "works and `nvidia-smi` shows the GPU; reinstalling a PyTorch build matching your driver often helps. "
    "tritonbits keeps working on CPU tensors."
)

# (substrings, any of which in the lower-cased error text selects the hint)
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("304", "operation not supported on this os", "cuda_error_operating_system"), _CONTAINER_HINT),
    (
        ("driver on your system is too old", "driver version is insufficient", "cuda_error_insufficient_driver"),
        _DRIVER_TOO_OLD_HINT,
    ),
    (("found no nvidia driver", "no cuda-capable device is detected", "cuda driver initialization failed"),
     _NO_DRIVER_HINT),
    (("no cuda gpus are available", "invalid device ordinal"), _NO_DEVICE_HINT),
)  # fmt: skip


def hint_for_error(error: str) -> str:
    """A plain-language hint for a CUDA query's error text (a generic one if none matches)."""
    text = error.lower()
    for needles, hint in _HINTS:
        if any(needle in text for needle in needles):
            return hint.format(cuda=torch.version.cuda or "version")
    return _GENERIC_CUDA_HINT


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# queries


def _ask(query: str, call: Callable, problems: list[Problem]):
    """Run one torch query; record exceptions and CUDA warnings as problems. Returns None on error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - any failure of the query is a finding
            message = _describe(error)
            problems.append(Problem(query, message, hint_for_error(message)))
            result = None
    for warning in caught:
        message = " ".join(str(warning.message).split())
        # PyTorch reports CUDA initialization failures (error 304, old driver) only as warnings.
        if "cuda" in message.lower() or "driver" in message.lower():
            problems.append(Problem(query, message, hint_for_error(message)))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result


def _arch(props, capability: tuple[int, int]) -> str:
    gcn = getattr(props, "gcnArchName", None)
    if torch.version.hip and gcn:
        return str(gcn)
    return f"sm_{capability[0]}{capability[1]}"


def probe_cuda() -> CudaProbe:
    """Ask PyTorch which GPUs it can use. Never raises; failures are in ``problems``.

    Reading device properties initializes CUDA in this process (as any GPU use would).
    """
    probe = CudaProbe(
        built_for_cuda=getattr(torch.version, "cuda", None),
        built_for_hip=getattr(torch.version, "hip", None),
    )
    problems = probe.problems
    probe.available = bool(_ask("torch.cuda.is_available()", lambda: torch.cuda.is_available(), problems))
    if not probe.available:
        return probe
    count = _ask("torch.cuda.device_count()", lambda: torch.cuda.device_count(), problems)
    probe.count = int(count or 0)
    for index in range(probe.count):
        capability = _ask(
            f"torch.cuda.get_device_capability({index})", lambda: torch.cuda.get_device_capability(index), problems
        )
        props = _ask(
            f"torch.cuda.get_device_properties({index})", lambda: torch.cuda.get_device_properties(index), problems
        )
        if capability is None or props is None:
            continue
        capability = (int(capability[0]), int(capability[1]))
        probe.devices.append(
            GpuInfo(
                index=index,
                name=str(getattr(props, "name", "unknown")),
                capability=capability,
                total_memory=int(getattr(props, "total_memory", 0)),
                multi_processor_count=int(getattr(props, "multi_processor_count", 0)),
                arch=_arch(props, capability),
            )
        )
    return probe


# Problems already warned about, so that each distinct failure is reported once per process.
_warned: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> bool:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process; True if it warned."""
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, category, stacklevel=3)
    return True


def cuda_devices() -> list[GpuInfo]:
    """The GPUs PyTorch can use ([] when none or when querying fails). Never raises.

    A failed query warns once (naming the error and what to try); CPU ops are unaffected.
    """
    probe = probe_cuda()
    for problem in probe.problems:
        warn_once(
            f"cuda:{problem.error}",
            f"tritonbits: {problem.query} failed: {problem.error}. {problem.hint} "
            "Run `python -m tritonbits` for a full diagnosis.",
        )
    return probe.devices


def cuda_available() -> bool:
    """True if PyTorch can use at least one GPU. Never raises (see :func:`cuda_devices`)."""
    return bool(cuda_devices())


# ---------------------------------------------------------------------------------------------
# Triton


def triton_version() -> Optional[str]:
    """Installed Triton's version from package metadata (does not import Triton); None if absent."""
    for distribution in ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-xpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - broken metadata is treated as "not installed"
            continue
    return None


def triton_import_error() -> Optional[str]:
    """None if ``import triton`` works, else why not (the exception text). Imports Triton."""
    try:
        importlib.import_module("triton")
    except Exception as error:  # noqa: BLE001 - a broken install can raise more than ImportError
        return _describe(error)
    return None


def triton_available() -> bool:
    """True if Triton can be imported (it is then imported). Never raises."""
    return triton_import_error() is None


def triton_supports_capability(capability: tuple[int, int]) -> bool:
    """True if Triton 3.x generates kernels for an NVIDIA GPU of this compute capability."""
    return tuple(capability) >= MIN_TRITON_CAPABILITY
