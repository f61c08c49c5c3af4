"""Gather the report, print it as text or JSON, and turn the verdict into an exit code.

Order of the text report: platform, Python, PyTorch (and the CUDA/HIP it was built for), GPUs,
Triton (with a compile-and-run check per GPU), related packages, environment variables, the
backend in use, then one PASS/FAIL/SKIP line per sanity check and device, the findings with
their hints, and the verdict. Exit code 0 when nothing failed, 1 otherwise (SKIPs do not fail).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable, Optional

from .. import device
from . import checks, report
from .report import ERROR, NOTE, WARNING, Finding, describe_error

_REPORT_HINT = "Please report it with the output of `python -m tritonbits --json`."
_IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning)


def _collect(section: str, collector: Callable, findings: list[Finding], fallback=None):
    """``collector()``, or ``fallback`` plus an error finding if it raises."""
    try:
        return collector()
    except Exception as error:  # noqa: BLE001 - a failed collector is a finding, not a traceback
        findings.append(Finding(ERROR, f"Could not collect {section}", describe_error(error), _REPORT_HINT))
        return fallback


def _tritonbits_version() -> str:
    from .. import __version__

    return __version__


def run_diagnostics(run_sanity: bool = True) -> dict:
    """The whole report as one JSON-ready dict. Never raises; problems become findings.

    Keys: tritonbits, platform, python, torch, gpus, triton, packages, environment, backend,
    checks, findings, verdict.
    """
    findings: list[Finding] = []
    result: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["tritonbits"] = _collect("the tritonbits version", _tritonbits_version, findings, "unknown")
        result["platform"] = _collect("platform facts", report.platform_facts, findings, {})
        result["python"] = _collect("Python facts", report.python_facts, findings, {})
        result["torch"] = _collect("PyTorch facts", report.torch_facts, findings, {})
        probe = _collect("GPU facts", device.probe_cuda, findings, device.CudaProbe())
        result["gpus"] = probe.as_dict()
        triton = _collect("Triton facts", report.triton_facts, findings,
                          {"version": None, "importable": False, "import_error": "unknown"})  # fmt: skip
        compile_checks = [checks.triton_compile_check(gpu, triton, bool(probe.built_for_hip)) for gpu in probe.devices]
        result["triton"] = {**triton, "compile": [check.as_dict() for check in compile_checks]}
        result["packages"] = _collect("package versions", report.package_facts, findings, {})
        result["environment"] = _collect("environment variables", report.environment_facts, findings, {})
        backend = _collect("backend facts", report.backend_facts, findings, {})
        result["backend"] = backend
        devices = ["cpu"] + [gpu.device for gpu in probe.devices]
        sanity = checks.run_sanity_checks(devices, backend) if run_sanity else []
        result["checks"] = [check.as_dict() for check in sanity]
    messages = [
        " ".join(f"{w.category.__name__}: {w.message}".split())
        for w in caught
        if not issubclass(w.category, _IGNORED_WARNINGS)
    ]
    findings += report.gpu_findings(probe)
    findings += report.triton_findings(triton, have_gpu=bool(probe.devices))
    findings += report.warning_findings(messages)
    result["findings"] = [finding.as_dict() for finding in findings]
    result["verdict"] = _verdict(compile_checks + sanity, findings, devices)
    return result


def _verdict(results: list[checks.CheckResult], findings: list[Finding], devices: list[str]) -> dict:
    counts = {status: sum(r.status == status for r in results) for status in (checks.PASS, checks.FAIL, checks.SKIP)}
    errors = sum(f.severity == ERROR for f in findings)
    failed = counts[checks.FAIL] > 0 or errors > 0
    if counts[checks.FAIL]:
        summary = "something is broken: see the FAIL lines and the findings above for what to try"
    elif errors:
        summary = f"the checks that ran passed on {', '.join(devices)}, but the [error] findings above need attention"
    elif devices == ["cpu"]:
        summary = "tritonbits works here on CPU (no GPU in use)"
    else:
        summary = f"tritonbits works here on {', '.join(devices)}"
    return {
        "status": "FAIL" if failed else "PASS",
        "exit_code": 1 if failed else 0,
        "passed": counts[checks.PASS],
        "failed": counts[checks.FAIL],
        "skipped": counts[checks.SKIP],
        "errors": errors,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------
# text


_LABEL = 13


def _line(label: str, text: str) -> str:
    return f"{label:<{_LABEL}}{text}"


def _sub(text: str) -> str:
    return " " * (_LABEL + 2) + text


def _check_lines(check: dict) -> list[str]:
    name = f"{check['name']:<27}"
    via = f"{check['via']:<18}"
    seconds = f"{check['seconds']:7.3f} s" if check["status"] != checks.SKIP else " " * 9
    lines = [f"  {check['status']:<4}  {check['device']:<7} {name}{via}{seconds}  {check['detail']}".rstrip()]
    if check.get("error"):
        lines.append(f"{'':14}error: {check['error']}")
    if check.get("hint"):
        lines.append(f"{'':14}hint:  {check['hint']}")
    return lines


def _gpu_lines(gpus: dict) -> list[str]:
    if not gpus.get("devices"):
        return [_line("GPUs", f"none: {gpus.get('no_gpu_reason') or 'unknown reason'}")]
    lines = [_line("GPUs", f"{len(gpus['devices'])} visible to PyTorch")]
    for gpu in gpus["devices"]:
        lines.append(_sub(f"{gpu['device']:<7} {gpu['name']}, {gpu['arch']}, {gpu['total_memory_gib']:.1f} GiB, "
                          f"{gpu['multi_processor_count']} SMs"))  # fmt: skip
    return lines


def _triton_lines(triton: dict, have_gpu: bool) -> list[str]:
    version = triton.get("version")
    if triton.get("importable"):
        state = f"{version or 'unknown version'}, imports fine"
    elif version:
        state = f"{version} installed but does not import ({triton.get('import_error')})"
    else:
        state = "not installed"
    if not have_gpu:
        state += "; no GPU to compile for (on CPU, kernels run only under TRITON_INTERPRET=1)"
    lines = [_line("Triton", state)]
    for check in triton.get("compile", []):
        seconds = f" ({check['seconds']:.2f} s)" if check["status"] != checks.SKIP else ""
        lines.append(_sub(f"{check['status']:<4}  {check['device']:<7} {check['detail']}{seconds}"))
        lines += [_sub(f"      {key}: {check[key]}") for key in ("error", "hint") if check.get(key)]
    return lines


def format_text(result: dict) -> str:
    """The human-readable report, in the documented order."""
    platform_facts, python, torch_facts = result.get("platform", {}), result.get("python", {}), result.get("torch", {})
    libc = f" ({platform_facts['libc']})" if platform_facts.get("libc") else ""
    packages = result.get("packages", {})
    environment = result.get("environment", {})
    backend = result.get("backend", {})
    lines = [
        f"tritonbits {result.get('tritonbits', 'unknown')} diagnostics",
        "",
        _line("Platform", f"{platform_facts.get('platform', 'unknown')}{libc}"),
        _line("Python", f"{python.get('version', 'unknown')} ({python.get('executable', '')})"),
        _line("PyTorch", f"{torch_facts.get('version', 'unknown')}, built for "
                         f"CUDA {torch_facts.get('cuda') or 'none'}, HIP {torch_facts.get('hip') or 'none'}"),  # fmt: skip
        *_gpu_lines(result.get("gpus", {})),
        *_triton_lines(result.get("triton", {}), bool(result.get("gpus", {}).get("devices"))),
        _line("Packages", ", ".join(f"{name} {version or '-'}" for name, version in packages.items()) or "-"),
        _line("Environment", ", ".join(f"{name}={value!r}" for name, value in environment.items()) or "nothing set"),
    ]
    if "CUDA_VISIBLE_DEVICES" not in environment:
        lines[-1] += " (CUDA_VISIBLE_DEVICES not set)"
    if backend:
        routed = ", ".join(backend.get("triton_device_types", [])) or "no device"
        lines.append(_line("Backend", f"TRITONBITS_BACKEND={backend.get('TRITONBITS_BACKEND')}: Triton kernels for "
                                      f"{routed} tensors, the PyTorch reference elsewhere"))  # fmt: skip
    if result.get("checks"):
        lines += ["", "Sanity checks (each op against float64 math; GPU times include first-call Triton compilation)"]
        for check in result["checks"]:
            lines += _check_lines(check)
    findings = result.get("findings", [])
    if findings:
        lines += ["", "Findings"]
        for finding in findings:
            detail = f": {finding['detail']}" if finding.get("detail") else ""
            lines.append(f"  [{finding['severity']}] {finding['title']}{detail}")
            if finding.get("hint"):
                lines.append(f"  {'':{len(finding['severity']) + 2}} hint: {finding['hint']}")
    verdict = result["verdict"]
    lines += [
        "",
        f"Verdict: {verdict['status']} - {verdict['passed']} passed, {verdict['failed']} failed, "
        f"{verdict['skipped']} skipped (skips do not fail the verdict), "
        f"{verdict['errors']} error finding{'' if verdict['errors'] == 1 else 's'}",
        f"         {verdict['summary']}",
    ]
    return "\n".join(lines)


def _internal_error_report(error: BaseException) -> dict:
    finding = Finding(ERROR, "The diagnostics themselves failed", describe_error(error), _REPORT_HINT)
    return {
        "findings": [finding.as_dict()],
        "verdict": {"status": "FAIL", "exit_code": 1, "passed": 0, "failed": 0, "skipped": 0, "errors": 1,
                    "summary": "the diagnostics could not finish"},  # fmt: skip
    }


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tritonbits [--json] [--no-checks]``; returns the exit code (0 pass, 1 fail)."""
    parser = argparse.ArgumentParser(
        prog="python -m tritonbits",
        description="Report what tritonbits sees on this machine and check that every op works on every device.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object (for bug reports)")
    parser.add_argument("--no-checks", action="store_true", help="facts only: skip the sanity runs of the ops")
    args = parser.parse_args(argv)
    try:
        result = run_diagnostics(run_sanity=not args.no_checks)
        text = json.dumps(result, indent=2, default=str) if args.json else format_text(result)
    except Exception as error:  # noqa: BLE001 - never a traceback: report the failure itself
        result = _internal_error_report(error)
        text = json.dumps(result, indent=2) if args.json else format_text(result)
    print(text)
    sys.stdout.flush()
    return int(result["verdict"]["exit_code"])
