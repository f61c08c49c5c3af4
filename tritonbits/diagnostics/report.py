"""Facts about the environment, and findings: problems stated plainly, each with what to try.

Facts come from ``platform``, ``sys``, ``torch`` (through :mod:`tritonbits.device`) and package
metadata; no package other than Triton is imported. Every collector returns plain JSON-ready
dicts and never raises.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .. import device

# Packages whose versions matter in bug reports, in the order shown.
RELATED_PACKAGES = ("transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "numpy")

# Variables that change what PyTorch, Triton or tritonbits do; prefixes end with "_".
ENVIRONMENT_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TRITON_",
    "TRITONBITS_",
)

ERROR, WARNING, NOTE = "error", "warning", "note"


@dataclass(frozen=True)
class Finding:
    """A problem or a notable fact. ``error`` findings fail the verdict; others only inform."""

    severity: str
    title: str
    detail: str = ""
    hint: str = ""

    def as_dict(self) -> dict:
        return {"severity": self.severity, "title": self.title, "detail": self.detail, "hint": self.hint}


def describe_error(error: BaseException) -> str:
    """``"TypeName: message"`` on one line (at most 500 characters)."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


# ---------------------------------------------------------------------------------------------
# facts


def platform_facts() -> dict:
    libc = "-".join(part for part in platform.libc_ver() if part) if platform.system() == "Linux" else ""
    return {"platform": platform.platform(), "machine": platform.machine(), "libc": libc or None}


def python_facts() -> dict:
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable}  # fmt: skip


def torch_facts() -> dict:
    return {
        "version": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None),
        "debug": bool(getattr(torch.version, "debug", False)),
    }


def package_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name`` from its metadata (not imported); None if absent."""
    try:
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001 - missing or broken metadata both read as "not installed"
        return None


def package_facts(names=RELATED_PACKAGES) -> dict:
    return {name: package_version(name) for name in names}


def environment_facts(environ=None) -> dict:
    """The behaviour-changing variables that are set, name -> value, in a stable order."""
    environ = os.environ if environ is None else environ
    found = {}
    for pattern in ENVIRONMENT_VARIABLES:
        if pattern.endswith("_"):
            found.update({name: environ[name] for name in sorted(environ) if name.startswith(pattern)})
        elif pattern in environ:
            found[pattern] = environ[pattern]
    return found


def triton_facts() -> dict:
    """Triton's installed version and whether it imports (this imports Triton)."""
    version = device.triton_version()
    error = device.triton_import_error()
    if error is not None and version is None and "No module named 'triton'" in error:
        error = "not installed"
    return {"version": version, "importable": error is None, "import_error": error}


def backend_facts() -> dict:
    """Which implementation serves which device type (see ``tritonbits.backends.registry``)."""
    from ..backends import registry

    backend = registry.selected_backend()
    triton_types = list(registry.triton_device_types(backend))
    return {
        "TRITONBITS_BACKEND": backend,
        "triton_device_types": triton_types,
        "ops_with_triton_kernels": sorted(registry.TRITON_KERNELS),
    }


# ---------------------------------------------------------------------------------------------
# findings


_CPU_BUILD_HINT = (
    "Install a CUDA (or ROCm) build of PyTorch from https://pytorch.org/get-started/locally/. "
    "tritonbits has no compiled binaries, so any CUDA version PyTorch ships for works at once."
)
_TRITON_MISSING_GPU_HINT = (
    "Install Triton (`pip install triton`; PyTorch's Linux CUDA wheels bring a matching one). Until then "
    "tritonbits runs the PyTorch reference on the GPU: correct, but slower."
)
_TRITON_MISSING_CPU_HINT = "Needed only for GPU kernels (and the CPU interpreter used in tests): `pip install triton`."


def gpu_findings(probe: device.CudaProbe, environ=None) -> list[Finding]:
    """Findings about GPU discovery: failed queries, no GPU, GPUs too old for Triton."""
    environ = os.environ if environ is None else environ
    findings = [
        Finding(ERROR, f"{problem.query} failed", problem.error, problem.hint) for problem in probe.problems
    ]
    if not probe.devices and not probe.problems:
        if not probe.built_for_cuda and not probe.built_for_hip:
            findings.append(Finding(NOTE, "PyTorch is a CPU-only build; tritonbits runs every op on CPU",
                                    f"torch {torch.__version__}", _CPU_BUILD_HINT))  # fmt: skip
        else:
            visible = environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None and visible.strip() in ("", "-1"):
                hint = "Unset CUDA_VISIBLE_DEVICES or list the GPUs to use (e.g. CUDA_VISIBLE_DEVICES=0)."
            else:
                hint = device.hint_for_error("no cuda gpus are available")
            findings.append(Finding(WARNING, "No GPU visible to PyTorch; tritonbits runs every op on CPU",
                                    probe.no_gpu_reason() or "", hint))  # fmt: skip
    for gpu in probe.devices:
        if not probe.built_for_hip and not device.triton_supports_capability(gpu.capability):
            need = "sm_{}{}".format(*device.MIN_TRITON_CAPABILITY)
            findings.append(
                Finding(
                    WARNING,
                    f"{gpu.device} ({gpu.name}, {gpu.arch}) is too old for Triton (needs {need} or newer)",
                    "",
                    "Triton cannot build kernels for this GPU, so tritonbits runs the PyTorch reference "
                    "on it (correct, slower); TRITONBITS_BACKEND=torch makes that explicit.",
                )
            )
    return findings


def triton_findings(triton: dict, have_gpu: bool) -> list[Finding]:
    if triton["importable"]:
        return []
    if triton["version"] is None:
        title, detail = "Triton is not installed", ""
    else:
        title, detail = f"Triton {triton['version']} is installed but cannot be imported", triton["import_error"]
    if have_gpu:
        return [Finding(ERROR, title, detail, _TRITON_MISSING_GPU_HINT)]
    return [Finding(NOTE, title, detail, _TRITON_MISSING_CPU_HINT)]


_DRIVER_WARNING = re.compile(r"driver|cuda initialization|cuda error", re.IGNORECASE)


def warning_findings(messages: list[str]) -> list[Finding]:
    """Python warnings raised while diagnosing (deduplicated), reported instead of printed."""
    findings = []
    for message in dict.fromkeys(messages):
        hint = device.hint_for_error(message) if _DRIVER_WARNING.search(message) else ""
        findings.append(Finding(WARNING, "Warning raised during the diagnosis", message, hint))
    return findings
