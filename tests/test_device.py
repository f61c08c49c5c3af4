"""tritonbits.device: asks torch only, never raises, warns once; importing tritonbits stays light."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from tritonbits import device

ERROR_304 = "CUDA error: OS call failed or operation not supported on this OS (304)"
QUERIES = ("is_available", "device_count", "get_device_capability", "get_device_properties")


def _raise_304(*args, **kwargs):
    raise RuntimeError(ERROR_304)


def _fake_gpu_torch(monkeypatch, count=2, capability=(8, 0), failing=None):
    """Make torch.cuda report ``count`` fake GPUs; the query named ``failing`` raises error 304."""
    props = SimpleNamespace(name="Fake A100", total_memory=40 * 1024**3, multi_processor_count=108)
    fakes = {
        "is_available": lambda: True,
        "device_count": lambda: count,
        "get_device_capability": lambda index=None: capability,
        "get_device_properties": lambda index=None: props,
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, _raise_304 if name == failing else fake)


# ---------------------------------------------------------------------------------------------
# import: no CUDA queries, no CUDA init, light

_IMPORT_PROBE = """
import json, sys, time
import torch
calls = []
def recorder(name):
    def record(*args, **kwargs):
        calls.append(name)
        raise RuntimeError("queried at import: " + name)
    return record
for name in ("is_available", "device_count", "get_device_capability", "get_device_properties",
             "init", "_lazy_init", "current_device", "mem_get_info"):
    setattr(torch.cuda, name, recorder(name))
start = time.perf_counter()
import tritonbits
seconds = time.perf_counter() - start
heavy = sorted(m for m in ("triton", "transformers", "peft", "accelerate", "scipy") if m in sys.modules)
print(json.dumps({"seconds": seconds, "calls": calls, "initialized": torch.cuda.is_initialized(), "heavy": heavy}))
"""


def test_import_queries_no_cuda_and_adds_under_half_a_second():
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for run in runs:
        assert run["calls"] == [], f"import tritonbits queried torch.cuda: {run['calls']}"
        assert run["initialized"] is False
        assert run["heavy"] == [], f"import tritonbits imported {run['heavy']}"
    # The time `import tritonbits` adds after `import torch` (median of 3 fresh processes).
    assert statistics.median(run["seconds"] for run in runs) < 0.5


# ---------------------------------------------------------------------------------------------
# probe_cuda


@pytest.mark.parametrize("failing", QUERIES)
def test_probe_records_a_raising_query_with_the_container_hint(monkeypatch, failing):
    _fake_gpu_torch(monkeypatch, failing=failing)
    probe = device.probe_cuda()  # must not raise
    assert [problem.query.split("(")[0] for problem in probe.problems][:1] == [f"torch.cuda.{failing}"]
    assert all("304" in problem.error and "--gpus all" in problem.hint for problem in probe.problems)
    assert probe.devices == []
    assert "could not query" in probe.no_gpu_reason()


def test_probe_reads_fake_gpus(monkeypatch):
    _fake_gpu_torch(monkeypatch, count=2, capability=(8, 6))
    probe = device.probe_cuda()
    assert probe.problems == []
    assert [gpu.device for gpu in probe.devices] == ["cuda:0", "cuda:1"]
    gpu = probe.devices[0]
    assert (gpu.name, gpu.capability, gpu.arch, gpu.multi_processor_count) == ("Fake A100", (8, 6), "sm_86", 108)
    assert gpu.total_memory_gib == pytest.approx(40.0)  # exact: 40 * 2**30 bytes
    assert probe.no_gpu_reason() is None
    json.dumps(probe.as_dict())  # JSON-ready


def test_torch_warning_about_old_driver_becomes_a_problem(monkeypatch):
    message = (
        "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). "
        "Please update your GPU driver by downloading and installing a new version."
    )

    def is_available():
        warnings.warn(message, UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torch warning must be absorbed, not re-emitted
        probe = device.probe_cuda()
    assert not probe.available
    assert len(probe.problems) == 1
    assert "too old" in probe.problems[0].error
    assert "driver" in probe.problems[0].hint and "older than the CUDA" in probe.problems[0].hint


def test_probe_on_this_machine_never_raises():
    probe = device.probe_cuda()
    if torch.cuda.is_available():
        assert len(probe.devices) == torch.cuda.device_count()
    else:
        assert probe.devices == [] and probe.no_gpu_reason()


def test_no_gpu_reason_names_an_empty_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    probe = device.CudaProbe(built_for_cuda="12.4")
    assert "CUDA_VISIBLE_DEVICES" in probe.no_gpu_reason()


@pytest.mark.parametrize(
    "error, expected",
    [
        (ERROR_304, "--gpus all"),
        ("Unexpected error from cudaGetDeviceCount(). Error 304: OS call failed", "NVIDIA Container Toolkit"),
        ("CUDA driver version is insufficient for CUDA runtime version", "older than the CUDA"),
        ("The NVIDIA driver on your system is too old (found version 10020)", "older than the CUDA"),
        ("Found no NVIDIA driver on your system.", "No NVIDIA driver"),
        ("No CUDA GPUs are available", "CUDA_VISIBLE_DEVICES"),
        ("something else entirely", "nvidia-smi"),
    ],
)
def test_hint_for_error(error, expected):
    assert expected in device.hint_for_error(error)


# ---------------------------------------------------------------------------------------------
# cuda_devices: warn once, CPU ops unaffected


def test_cuda_devices_warns_once_and_returns_nothing(monkeypatch):
    monkeypatch.setattr(device, "_warned", set())
    for name in QUERIES:
        monkeypatch.setattr(torch.cuda, name, _raise_304)
    with pytest.warns(RuntimeWarning) as first:
        assert device.cuda_devices() == []
    assert len(first) == 1
    text = str(first[0].message)
    assert "304" in text and "--gpus all" in text and "python -m tritonbits" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.cuda_devices() == []  # the same problem is not warned again
        assert device.cuda_available() is False


def test_cpu_ops_keep_working_when_cuda_queries_raise(monkeypatch, rng):
    import tritonbits.functional as F

    monkeypatch.setattr(device, "_warned", set())
    for name in QUERIES:
        monkeypatch.setattr(torch.cuda, name, _raise_304)
    with pytest.warns(RuntimeWarning, match="304"):
        device.cuda_devices()
    x = torch.randn(7, 33, generator=rng)
    codes, state = F.quantize_blockwise(x, blocksize=64)
    # 8-bit dynamic map: within 2% of each block's absmax (the map's widest half-gap is ~0.8%).
    assert (F.dequantize_blockwise(codes, state) - x).abs().max() <= 0.02 * x.abs().max()
    packed, state4 = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    # NF4: the widest half-gap of the table is < 0.17 of absmax.
    assert (F.dequantize_4bit(packed, state4) - x).abs().max() <= 0.17 * x.abs().max()


# ---------------------------------------------------------------------------------------------
# Triton


def test_triton_import_error_when_triton_cannot_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    error = device.triton_import_error()
    assert error is not None and "import of triton halted" in error
    assert device.triton_available() is False


def test_triton_version_reads_metadata_without_importing():
    pytest.importorskip("triton", reason="Triton is not installed here")
    assert device.triton_version()
    assert device.triton_available() is True


@pytest.mark.parametrize("capability, supported", [((6, 1), False), ((7, 0), False), ((7, 5), True), ((9, 0), True)])
def test_triton_supports_capability(capability, supported):
    assert device.triton_supports_capability(capability) is supported
