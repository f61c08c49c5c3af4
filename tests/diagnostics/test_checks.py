"""tritonbits.diagnostics.checks: each sanity check passes on working ops and FAILs on broken ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tritonbits.functional as F
from tritonbits import device
from tritonbits.diagnostics import checks

NAMES = [name for name, _, _ in checks.SANITY_CHECKS]
CHECKS = {name: check for name, _, check in checks.SANITY_CHECKS}
FAKE_GPU = device.GpuInfo(index=0, name="Fake H100", capability=(9, 0), total_memory=80 * 1024**3,
                          multi_processor_count=132, arch="sm_90")  # fmt: skip
TRITON_OK = {"version": "3.9.0", "importable": True, "import_error": None}


@pytest.mark.parametrize("name", NAMES)
def test_sanity_check_passes_on_cpu(name):
    result = checks.run_check(name, "cpu", CHECKS[name])
    if result.status == checks.SKIP:  # only the optimizer may be missing while it is being written
        assert name == "8-bit AdamW step" and result.detail.startswith("not available:")
        pytest.skip(result.detail)
    assert result.status == checks.PASS, (result.detail, result.error)
    assert result.seconds > 0 and result.detail


def _scaled(fn, factor):
    def broken(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out * factor
    return broken


@pytest.mark.parametrize(
    "name, op, breakage",
    [
        ("8-bit quantize/dequantize", "dequantize_blockwise", lambda fn: _scaled(fn, 1.01)),
        ("4-bit quantize/dequantize", "dequantize_4bit", lambda fn: _scaled(fn, 0.97)),
        ("4-bit matmul (gemv_4bit)", "gemv_4bit", lambda fn: _scaled(fn, 1.02)),
        ("int8 matmul", "int8_linear_matmul", lambda fn: lambda A, B, *a, **k: fn(A, B, *a, **k) + 1),
        ("int8 matmul", "int8_scaled_mm", lambda fn: _scaled(fn, 1.01)),
    ],
)
def test_sanity_check_fails_on_a_broken_op(monkeypatch, name, op, breakage):
    monkeypatch.setattr(F, op, breakage(getattr(F, op)))
    result = checks.run_check(name, "cpu", CHECKS[name])
    assert result.status == checks.FAIL
    assert "float64" in result.hint or "expected" in result.hint
    assert result.detail  # says what differed


def test_quantize_check_fails_when_codes_are_not_nearest(monkeypatch):
    original = F.quantize_blockwise

    def off_by_one(A, *args, **kwargs):
        codes, state = original(A, *args, **kwargs)
        return (codes.int() + 1).clamp(max=255).to(torch.uint8), state

    monkeypatch.setattr(F, "quantize_blockwise", off_by_one)
    result = checks.run_check("8-bit", "cpu", checks.check_quantize_8bit)
    assert result.status == checks.FAIL and "nearest" in result.detail


def _bnb_adamw8bit_steps(p0, grads, device_name, lr, betas, eps, weight_decay):
    bnb_optim = pytest.importorskip("bitsandbytes.optim", reason="bitsandbytes is a test dependency")
    param = torch.nn.Parameter(p0.clone())
    optimizer = bnb_optim.AdamW8bit([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for g in grads:
        param.grad = g
        optimizer.step()
    return param.detach(), optimizer.state[param]["state1"]


def test_adamw_check_accepts_bitsandbytes_and_rejects_a_missing_weight_decay():
    assert checks.check_adamw_8bit("cpu", _bnb_adamw8bit_steps).startswith("2 steps")

    def no_weight_decay(p0, grads, device_name, lr, betas, eps, weight_decay):
        return _bnb_adamw8bit_steps(p0, grads, device_name, lr, betas, eps, 0.0)

    result = checks.run_check("adamw", "cpu", lambda d: checks.check_adamw_8bit(d, no_weight_decay))
    assert result.status == checks.FAIL and "float64 AdamW" in result.detail


def test_adamw_check_rejects_32bit_states():
    def float_states(p0, grads, device_name, lr, betas, eps, weight_decay):
        p, _ = _bnb_adamw8bit_steps(p0, grads, device_name, lr, betas, eps, weight_decay)
        return p, torch.zeros(p.shape)

    result = checks.run_check("adamw", "cpu", lambda d: checks.check_adamw_8bit(d, float_states))
    assert result.status == checks.FAIL and "not 8-bit" in result.detail


def test_adamw_check_skips_when_nothing_implements_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonbits.optim", None)
    from tritonbits import _ops
    from tritonbits.backends import registry

    monkeypatch.delitem(_ops.REFERENCES, "optimizer_update_8bit_blockwise", raising=False)
    monkeypatch.delitem(registry.TRITON_KERNELS, "optimizer_update_8bit_blockwise", raising=False)
    result = checks.run_check("8-bit AdamW step", "cpu", checks.check_adamw_8bit)
    assert result.status == checks.SKIP
    assert result.detail.startswith("not available: tritonbits.optim.AdamW8bit")


def test_run_check_turns_exceptions_into_fail_with_hint():
    def crash(device_name):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    result = checks.run_check("crash", "cpu", crash)
    assert result.status == checks.FAIL
    assert result.error.startswith("RuntimeError: CUDA error: an illegal memory access")
    assert "TRITONBITS_BACKEND=torch" in result.hint
    assert set(result.as_dict()) >= {"name", "device", "status", "seconds", "error", "hint"}


@pytest.mark.parametrize(
    "error, expected",
    [
        ("RuntimeError: Failed to find C compiler. Please specify via CC environment variable.", "C compiler"),
        ("fatal error: Python.h: No such file or directory", "python3-dev"),
        ("PTXASError: ptxas fatal", "TRITON_PTXAS_PATH"),
        ("OSError: [Errno 30] Read-only file system: '/root/.triton'", "TRITON_CACHE_DIR"),
        ("torch.OutOfMemoryError: CUDA out of memory.", "nvidia-smi"),
        ("NotImplementedError: Could not run 'tritonbits::gemv_4bit' with arguments", "TRITONBITS_BACKEND=torch"),
        ("ValueError: something new", "--json"),
    ],
)
def test_hint_for_failure(error, expected):
    assert expected in checks.hint_for_failure(error)


# ---------------------------------------------------------------------------------------------
# Triton compile check


def test_compile_failure_is_a_fail_with_a_hint(monkeypatch):
    def cannot_compile(device_name):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(checks, "check_triton_kernel", cannot_compile)
    result = checks.triton_compile_check(FAKE_GPU, TRITON_OK, rocm=False)
    assert (result.status, result.device) == (checks.FAIL, "cuda:0")
    assert "Failed to find C compiler" in result.error and "install a C compiler" in result.hint


def test_compile_check_fails_when_triton_is_missing():
    missing = {"version": None, "importable": False, "import_error": "not installed"}
    result = checks.triton_compile_check(FAKE_GPU, missing, rocm=False)
    assert result.status == checks.FAIL and "pip install triton" in result.hint


def test_compile_check_skips_gpus_too_old_for_triton():
    pascal = device.GpuInfo(0, "Tesla P100", (6, 0), 16 * 1024**3, 56, "sm_60")
    result = checks.triton_compile_check(pascal, TRITON_OK, rocm=False)
    assert result.status == checks.SKIP and "sm_60" in result.detail
    assert "TRITONBITS_BACKEND=torch" in result.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compile for")
def test_compile_check_on_the_gpu():
    gpu = device.probe_cuda().devices[0]
    result = checks.triton_compile_check(gpu, {"version": device.triton_version(), "importable": True}, False)
    assert result.status == checks.PASS, result.error


def test_probe_kernel_runs_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed here")
    code = "from tritonbits.diagnostics import checks; print(checks.check_triton_kernel('cpu'))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiled and ran" in done.stdout


def test_implementation_routing():
    backend = {"triton_device_types": ["cuda"], "ops_with_triton_kernels": ["gemv_4bit"]}
    assert checks.implementation(("gemv_4bit",), "cuda:0", backend) == "triton"
    assert checks.implementation(("gemv_4bit", "quantize_4bit"), "cuda:1", backend) == "triton+reference"
    assert checks.implementation(("gemv_4bit",), "cpu", backend) == "reference"
