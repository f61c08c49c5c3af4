"""`python -m tritonbits`: ordered report, JSON, exit codes, and broken environments without tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tritonbits import device
from tritonbits.diagnostics import checks, cli, report

ERROR_304 = "CUDA error: OS call failed or operation not supported on this OS (304)"
SECTIONS = ("Platform", "Python", "PyTorch", "GPUs", "Triton", "Packages", "Environment", "Sanity checks",
            "Verdict")  # fmt: skip
FAKE_GPU = device.GpuInfo(0, "Fake H100", (9, 0), 80 * 1024**3, 132, "sm_90")

# Runs `python -m tritonbits ARGS` in a fresh process after applying PATCH (Python source).
_WRAPPER = """
import runpy, sys, torch
{patch}
sys.argv = ["tritonbits"] + {args!r}
runpy.run_module("tritonbits", run_name="__main__")
"""
_PATCH_304 = """
def _raise_304(*args, **kwargs):
    raise RuntimeError({error!r})
for _name in ("is_available", "device_count", "get_device_capability", "get_device_properties"):
    setattr(torch.cuda, _name, _raise_304)
""".format(error=ERROR_304)


def _run_module(patch: str = "", args=()) -> subprocess.CompletedProcess:
    code = _WRAPPER.format(patch=patch, args=list(args))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# real runs on this machine


def test_text_report_is_ordered_and_passes_here():
    done = subprocess.run([sys.executable, "-m", "tritonbits"], capture_output=True, text=True, timeout=300)
    _assert_no_traceback(done)
    positions = [done.stdout.find(f"\n{section}") for section in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), done.stdout
    for name, _, _ in checks.SANITY_CHECKS:
        assert f"cpu     {name}" in done.stdout
    assert "FAIL" not in done.stdout
    assert done.returncode == 0 and "Verdict: PASS" in done.stdout


def test_json_report_has_every_section_and_check_field(capsys):
    exit_code = cli.main(["--json"])
    out = capsys.readouterr().out
    result = json.loads(out)  # one JSON object, nothing else on stdout
    assert set(result) >= {"tritonbits", "platform", "python", "torch", "gpus", "triton", "packages",
                           "environment", "backend", "checks", "findings", "verdict"}  # fmt: skip
    assert {check["device"] for check in result["checks"]} >= {"cpu"}
    for check in result["checks"]:
        assert set(check) >= {"name", "device", "status", "seconds", "error", "hint"}
        assert check["status"] in ("PASS", "SKIP")
    assert result["verdict"]["exit_code"] == exit_code == 0
    assert result["torch"]["version"] == torch.__version__


# ---------------------------------------------------------------------------------------------
# broken environments, as a user would run them


def test_error_304_in_a_subprocess_is_a_finding_with_the_container_hint():
    done = _run_module(_PATCH_304)
    _assert_no_traceback(done)
    assert "304" in done.stdout and "--gpus all" in done.stdout and "NVIDIA Container Toolkit" in done.stdout
    # CPU ops still work, but a GPU query that raises is an error: the verdict fails.
    for name, _, _ in checks.SANITY_CHECKS:
        assert f"FAIL  cpu     {name}" not in done.stdout
    assert "PASS  cpu     8-bit quantize/dequantize" in done.stdout
    assert done.returncode == 1 and "Verdict: FAIL" in done.stdout


def test_triton_missing_in_a_subprocess_is_reported_not_raised():
    done = _run_module('sys.modules["triton"] = None', args=["--json"])
    _assert_no_traceback(done)
    result = json.loads(done.stdout)
    assert result["triton"]["importable"] is False
    assert "import of triton halted" in result["triton"]["import_error"]
    titles = [finding["title"] for finding in result["findings"]]
    assert any("cannot be imported" in title for title in titles)
    if not torch.cuda.is_available():  # on CPU, Triton is optional: a note, and the CPU checks pass
        assert done.returncode == 0


# ---------------------------------------------------------------------------------------------
# in process, with simulated hardware


def _fake_probe(*gpus: device.GpuInfo):
    probe = device.CudaProbe(built_for_cuda="12.4", available=True, count=len(gpus), devices=list(gpus))
    return lambda: probe


def test_raising_queries_in_process(monkeypatch):
    def _raise_304(*args, **kwargs):
        raise RuntimeError(ERROR_304)

    for name in ("is_available", "device_count", "get_device_capability", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, _raise_304)
    result = cli.run_diagnostics()
    errors = [f for f in result["findings"] if f["severity"] == "error"]
    assert errors and "304" in errors[0]["detail"] and "--gpus all" in errors[0]["hint"]
    assert all(check["status"] != "FAIL" for check in result["checks"])  # CPU ops keep working
    assert result["verdict"]["status"] == "FAIL" and result["verdict"]["exit_code"] == 1


def test_kernel_that_fails_to_compile(monkeypatch, capsys):
    def cannot_compile(device_name):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(device, "probe_cuda", _fake_probe(FAKE_GPU))
    monkeypatch.setattr(report.device, "triton_import_error", lambda: None)
    monkeypatch.setattr(checks, "check_triton_kernel", cannot_compile)
    exit_code = cli.main(["--no-checks"])
    out = capsys.readouterr().out
    assert exit_code == 1
    assert "cuda:0  Fake H100, sm_90, 80.0 GiB, 132 SMs" in out
    assert "FAIL  cuda:0" in out and "Failed to find C compiler" in out and "install a C compiler" in out
    assert "Traceback" not in out and "Verdict: FAIL" in out


def test_gpu_too_old_for_triton(monkeypatch):
    pascal = device.GpuInfo(0, "Tesla P100", (6, 0), 16 * 1024**3, 56, "sm_60")
    monkeypatch.setattr(device, "probe_cuda", _fake_probe(pascal))
    result = cli.run_diagnostics(run_sanity=False)
    assert result["triton"]["compile"][0]["status"] == "SKIP"
    too_old = [f for f in result["findings"] if "too old for Triton" in f["title"]]
    assert too_old and "TRITONBITS_BACKEND=torch" in too_old[0]["hint"]
    assert result["verdict"]["exit_code"] == 0  # a SKIP alone does not fail


def test_no_gpu_on_a_cuda_build(monkeypatch):
    monkeypatch.setattr(device, "probe_cuda", lambda: device.CudaProbe(built_for_cuda="12.4"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = cli.run_diagnostics(run_sanity=False)
    assert "sees no GPU" in result["gpus"]["no_gpu_reason"]
    warning = [f for f in result["findings"] if f["title"].startswith("No GPU visible")]
    assert warning and "nvidia-smi" in warning[0]["hint"]
    assert result["verdict"]["exit_code"] == 0


def test_skip_is_shown_and_does_not_fail_the_verdict(monkeypatch, capsys):
    def unavailable():
        raise checks.Unavailable("tritonbits.optim.AdamW8bit (simulated)")

    monkeypatch.setattr(checks, "_adamw_8bit_runner", unavailable)
    exit_code = cli.main([])
    out = capsys.readouterr().out
    assert "SKIP  cpu     8-bit AdamW step" in out and "not available: tritonbits.optim.AdamW8bit (simulated)" in out
    # one SKIP line per device (cpu, plus each GPU where the test runs on one)
    assert exit_code == 0 and re.search(r"\b[1-9]\d* skipped", out) and "Verdict: PASS" in out


def test_a_failing_collector_becomes_a_finding(monkeypatch):
    def broken():
        raise OSError("platform.libc_ver exploded")

    monkeypatch.setattr(report, "platform_facts", broken)
    result = cli.run_diagnostics(run_sanity=False)
    assert any("platform.libc_ver exploded" in f["detail"] for f in result["findings"])
    assert result["verdict"]["exit_code"] == 1
    assert "Verdict: FAIL" in cli.format_text(result)


@pytest.mark.parametrize("as_json", [False, True])
def test_internal_error_is_reported_without_traceback(monkeypatch, capsys, as_json):
    def crash(run_sanity=True):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "run_diagnostics", crash)
    exit_code = cli.main(["--json"] if as_json else [])
    out = capsys.readouterr().out
    assert exit_code == 1 and "Traceback" not in out and "boom" in out
    if as_json:
        assert json.loads(out)["verdict"]["status"] == "FAIL"


def test_main_entry_point_returns_the_exit_code(monkeypatch):
    from tritonbits.__main__ import main

    monkeypatch.setattr(cli, "run_diagnostics", lambda run_sanity=True: {
        "findings": [], "checks": [], "verdict": {"status": "PASS", "exit_code": 0, "passed": 0, "failed": 0,
                                                  "skipped": 0, "errors": 0, "summary": "ok"}})  # fmt: skip
    assert main(["--no-checks"]) == 0
