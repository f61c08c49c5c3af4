"""Sanity runs: each op family on each device through ``tritonbits.functional``, against float64 math.

Each check returns one :class:`CheckResult` (PASS, FAIL or SKIP, with its time) and never
raises: an exception becomes a FAIL with the error text and a hint. Inputs are small, seeded and
random, so the whole CPU run takes well under a second after warm-up. The expected values are
computed here in float64 from the definitions of the formats, not by calling the reference ops,
so a check can fail on the CPU too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import device as device_info
from .report import describe_error

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class CheckResult:
    """The outcome of one check on one device. ``seconds`` is wall time including compilation."""

    name: str
    device: str
    status: str
    seconds: float
    detail: str = ""
    error: str = ""
    hint: str = ""
    via: str = ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "device": self.device,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "via": self.via,
            "detail": self.detail,
            "error": self.error or None,
            "hint": self.hint or None,
        }


class Mismatch(AssertionError):
    """Results differ from the float64 expectation by more than the stated tolerance."""


class Unavailable(Exception):
    """The feature under check is not available here (reported as SKIP)."""


# ---------------------------------------------------------------------------------------------
# hints for failures


_FAILURE_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("failed to find c compiler", "no such file or directory: 'gcc'", "cc: not found"),
     "Triton builds a small C launcher on first use: install a C compiler (gcc or clang) or point CC at one."),
    (("python.h",), "Triton needs the Python development headers: install python3-dev (or python3-devel)."),
    (("ptxas",),
     "Triton's bundled ptxas failed: reinstall triton, or set TRITON_PTXAS_PATH to a CUDA toolkit's ptxas."),
    (("read-only file system", "permission denied"),
     "Triton's cache directory is not writable: set TRITON_CACHE_DIR to a writable directory."),
    (("out of memory",), "The GPU ran out of memory: free it (other processes, see `nvidia-smi`) and run again."),
    (("no module named 'triton'", "import of triton halted"),
     "Triton is not importable: `pip install triton` (PyTorch's Linux CUDA wheels bring a matching one)."),
    (("could not run 'tritonbits::",),
     "No implementation of this op is registered for this device; "
     "TRITONBITS_BACKEND=torch selects the PyTorch reference everywhere."),
    (("illegal memory access", "device-side assert", "misaligned address", "unspecified launch failure"),
     "A GPU kernel crashed; later GPU checks in this process may fail the same way. Work around it with "
     "TRITONBITS_BACKEND=torch and report it with the output of `python -m tritonbits --json`."),
)  # fmt: skip

_MISMATCH_HINT = (
    "Results differ from the expected values: a kernel or reference bug. TRITONBITS_BACKEND=torch uses the "
    "PyTorch reference; please report it with the output of `python -m tritonbits --json`."
)
_DEFAULT_HINT = (
    "Unexpected error. TRITONBITS_BACKEND=torch uses the PyTorch reference; please report it with the output "
    "of `python -m tritonbits --json`."
)


def hint_for_failure(error: str) -> str:
    """A plain-language hint for a failed check's error text."""
    text = error.lower()
    for needles, hint in _FAILURE_HINTS:
        if any(needle in text for needle in needles):
            return hint
    if "cuda" in text or "driver" in text:
        return device_info.hint_for_error(error)
    return _DEFAULT_HINT


def run_check(name: str, device: str, check: Callable[[str], str], via: str = "") -> CheckResult:
    """Run ``check(device)`` (returns a detail line, raises to fail) and time it. Never raises."""
    start = time.perf_counter()
    try:
        detail = check(device)
        _synchronize(device)
        status, error, hint = PASS, "", ""
    except Unavailable as reason:
        status, detail, error, hint = SKIP, f"not available: {reason}", "", ""
    except Mismatch as mismatch:
        status, detail, error, hint = FAIL, str(mismatch), "", _MISMATCH_HINT
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, never a traceback
        error = describe_error(exc)
        status, detail, hint = FAIL, "", hint_for_failure(error)
    return CheckResult(name, device, status, time.perf_counter() - start, detail, error, hint, via)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


# ---------------------------------------------------------------------------------------------
# op families


def _expect_nearest_codes(x: torch.Tensor, y: torch.Tensor, decoded: torch.Tensor, absmax: torch.Tensor,
                          code: torch.Tensor, blocksize: int) -> float:  # fmt: skip
    """Check that y is the codebook value nearest to x in every block; returns max |y - x|.

    x, y, decoded: flat float64 on CPU (input, dequantized output, code[codes] * absmax).
    """
    n = x.numel()
    expected_absmax = torch.nn.functional.pad(x.abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    # absmax is a max of float32 inputs, hence exact.
    _require(torch.equal(absmax, expected_absmax), "absmax differs from the per-block max |x|")
    scale = absmax.repeat_interleave(blocksize)[:n]
    # y must be a codebook value (to float32 rounding, rel 1e-6) ...
    _require(torch.allclose(y, decoded, rtol=1e-6, atol=0), "dequantized values are not code[codes] * absmax")
    # ... and the nearest one to x (ties either way; slack: float32 rounding, 1e-6 of the scale).
    nearest = (code[None, :] * scale[:, None] - x[:, None]).abs().amin(1)
    error = (y - x).abs()
    worst = (error - nearest - 1e-6 * scale).max().item() if n else 0.0
    _require(worst <= 0, f"a value is not rounded to its nearest code (excess {worst:.3g})")
    return error.max().item() if n else 0.0


def check_quantize_8bit(device: str) -> str:
    """8-bit blockwise: 1551 values (a partial last block), blocksize 256, the dynamic map."""
    from .. import functional as F

    blocksize = 256
    x = torch.randn(3, 517, generator=_generator(1)) * 3
    codes, state = F.quantize_blockwise(x.to(device), blocksize=blocksize)
    y = F.dequantize_blockwise(codes, state)
    _require(codes.dtype == torch.uint8 and y.shape == x.shape and y.dtype == x.dtype,
             f"got codes {codes.dtype}, output {tuple(y.shape)} {y.dtype}")  # fmt: skip
    code = state.code.double().cpu()
    absmax = state.absmax.double().cpu()
    decoded = code[codes.cpu().long().flatten()] * absmax.repeat_interleave(blocksize)[: x.numel()]
    worst = _expect_nearest_codes(x.double().flatten(), y.double().cpu().flatten(), decoded, absmax, code, blocksize)
    return f"{x.numel()} values, blocksize {blocksize}: all on their nearest code, max |err| {worst:.2g}"


def _unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.cpu().reshape(-1).view(torch.uint8).long()
    return torch.stack([flat >> 4, flat & 0xF], dim=1).flatten()[:n]


def check_quantize_4bit(device: str) -> str:
    """NF4 and FP4: 645 values (odd count, partial last block), blocksize 64."""
    from .. import functional as F

    blocksize = 64
    x = torch.randn(3, 215, generator=_generator(2)) * 2
    worst = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(x.to(device), blocksize=blocksize, quant_type=quant_type)
        y = F.dequantize_4bit(packed, state)
        _require(y.shape == x.shape and y.dtype == x.dtype, f"{quant_type}: output {tuple(y.shape)} {y.dtype}")
        code = state.code.double().cpu()
        absmax = state.absmax.double().cpu()
        decoded = code[_unpack_4bit(packed, x.numel())] * absmax.repeat_interleave(blocksize)[: x.numel()]
        worst[quant_type] = _expect_nearest_codes(
            x.double().flatten(), y.double().cpu().flatten(), decoded, absmax, code, blocksize
        )
    errors = ", ".join(f"{name} {value:.2g}" for name, value in worst.items())
    return f"{x.numel()} values, blocksize {blocksize}: all on their nearest code, max |err| {errors}"


def check_gemv_4bit(device: str) -> str:
    """4-bit matmul (inference path): fp16 A [1, 256] times NF4 W [48, 256] transposed."""
    from .. import functional as F

    n_out, k = 48, 256
    generator = _generator(3)
    weight = torch.randn(n_out, k, generator=generator).to(device, torch.float16)
    a = torch.randn(1, k, generator=generator).to(device, torch.float16)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    out = F.gemv_4bit(a, packed.t(), state=state)
    _require(out.shape == (1, n_out) and out.dtype == torch.float16, f"got {tuple(out.shape)} {out.dtype}")
    w = F.dequantize_4bit(packed, state).double().cpu()
    a64 = a.double().cpu()
    expected = a64 @ w.T
    # fp16 output and accumulation: 4e-3 of sum |a| |w| (8 fp16 ulps of the largest partial sum).
    bound = 4e-3 * (a64.abs() @ w.abs().T)
    excess = ((out.double().cpu() - expected).abs() - bound).max().item()
    _require(excess <= 0, f"gemv_4bit differs from float64 A @ W.T beyond 4e-3 * sum|a||w| (by {excess:.3g})")
    err = (out.double().cpu() - expected).abs().max().item()
    return f"[1, {k}] x [{n_out}, {k}]^T nf4: max |err| {err:.2g} vs float64"


def check_int8_matmul(device: str) -> str:
    """int8_linear_matmul exact against int64; int8_scaled_mm within fp16 rounding."""
    from .. import functional as F

    m, n_out, k = 5, 24, 64
    generator = _generator(4)
    a = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (n_out, k), generator=generator, dtype=torch.int8)
    row_stats = torch.rand(m, generator=generator) * 4 + 0.1
    col_stats = torch.rand(n_out, generator=generator) * 4 + 0.1
    bias = torch.randn(n_out, generator=generator).half()
    exact = a.long() @ b.long().T
    product = F.int8_linear_matmul(a.to(device), b.to(device))
    _require(product.dtype == torch.int32 and torch.equal(product.cpu().long(), exact),
             "int8_linear_matmul is not the exact integer product")  # fmt: skip
    out = F.int8_scaled_mm(a.to(device), b.to(device), row_stats.to(device), col_stats.to(device), bias=bias.to(device))
    expected = exact.double() * row_stats.double()[:, None] * col_stats.double()[None, :] / 127**2 + bias.double()
    # fp16 output: relative 2e-3 (4 ulps) plus 1e-3 absolute near zero.
    _require(torch.allclose(out.double().cpu(), expected, rtol=2e-3, atol=1e-3),
             "int8_scaled_mm differs from float64 (A @ B.T) * row * col / 127^2 + bias beyond rtol 2e-3")  # fmt: skip
    err = (out.double().cpu() - expected).abs().max().item()
    return f"[{m}, {k}] x [{n_out}, {k}]^T: exact int32, scaled max |err| {err:.2g}"


def _adamw_float64(p0: torch.Tensor, grads, lr, betas, eps, weight_decay) -> torch.Tensor:
    """AdamW (decoupled weight decay, bias-corrected) in float64."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        g = g.double()
        p *= 1 - lr * weight_decay
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        p -= lr * m_hat / (v_hat.sqrt() + eps)
    return p


def _adamw8bit_steps(p0, grads, device, lr, betas, eps, weight_decay):
    """Run the steps with ``tritonbits.optim.AdamW8bit``; returns (parameter, state1)."""
    from ..optim import AdamW8bit

    param = torch.nn.Parameter(p0.clone().to(device))
    optimizer = AdamW8bit([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for g in grads:
        param.grad = g.to(device)
        optimizer.step()
    return param.detach(), optimizer.state[param].get("state1")


def _functional_steps(p0, grads, device, lr, betas, eps, weight_decay):
    """The same steps through ``functional.optimizer_update_8bit_blockwise`` (states made here)."""
    from .. import functional as F

    blocks = -(p0.numel() // -256)  # 8-bit optimizer states keep one absmax per 256 values
    p = p0.clone().to(device)
    state1 = torch.zeros(p0.shape, dtype=torch.uint8, device=device)
    state2 = torch.zeros_like(state1)
    absmax1 = torch.zeros(blocks, device=device)
    absmax2 = torch.zeros_like(absmax1)
    qmap1 = F.create_dynamic_map(signed=True).to(device)
    qmap2 = F.create_dynamic_map(signed=False).to(device)
    for step, g in enumerate(grads, start=1):
        F.optimizer_update_8bit_blockwise("adam", g.to(device), p, state1, state2, betas[0], betas[1], 0.0, 0.0,
                                          eps, step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay)  # fmt: skip
    return p, state1


def _adamw_8bit_runner():
    """The optimizer class if importable, else the functional op if implemented; else Unavailable."""
    from .. import _ops
    from ..backends import registry

    try:
        from ..optim import AdamW8bit  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        reason = f"tritonbits.optim.AdamW8bit ({describe_error(error)})"
    else:
        return "tritonbits.optim.AdamW8bit", _adamw8bit_steps
    name = "optimizer_update_8bit_blockwise"
    if name in _ops.REFERENCES or name in registry.TRITON_KERNELS:
        return f"functional.{name}", _functional_steps
    raise Unavailable(f"{reason}; functional.{name} has no implementation yet")


def check_adamw_8bit(device: str, steps_fn: Optional[Callable] = None) -> str:
    """Two AdamW steps with 8-bit states on a 64 x 96 parameter, against float64 AdamW."""
    label, steps_fn = ("given", steps_fn) if steps_fn else _adamw_8bit_runner()
    lr, betas, eps, weight_decay = 1e-3, (0.9, 0.999), 1e-8, 0.1
    generator = _generator(5)
    p0 = torch.randn(64, 96, generator=generator)  # 6144 >= min_8bit_size (4096): 8-bit states
    grads = [torch.randn(64, 96, generator=generator) for _ in range(2)]
    param, state1 = steps_fn(p0, grads, device, lr, betas, eps, weight_decay)
    _require(isinstance(state1, torch.Tensor) and state1.dtype == torch.uint8,
             f"optimizer state1 is not 8-bit ({getattr(state1, 'dtype', type(state1).__name__)})")  # fmt: skip
    expected = _adamw_float64(p0, grads, lr, betas, eps, weight_decay)
    error = (param.double().cpu() - expected).abs()
    # Step 1 is exact up to float32; step 2 reads 8-bit states (~1% relative error): each element
    # moves about lr per step, so allow 0.25 lr worst case and 0.02 lr on average.
    _require(error.max().item() <= 0.25 * lr and error.mean().item() <= 0.02 * lr,
             f"parameters differ from float64 AdamW: max {error.max().item() / lr:.3g} lr, "
             f"mean {error.mean().item() / lr:.3g} lr (allowed 0.25 and 0.02)")  # fmt: skip
    return (f"2 steps on [64, 96] via {label}: max |err| {error.max().item() / lr:.2g} lr, "
            f"mean {error.mean().item() / lr:.2g} lr")  # fmt: skip


def check_triton_kernel(device: str) -> str:
    """Compile and run a tiny ``@triton.jit`` kernel on ``device`` and check its result exactly."""
    from . import triton_probe

    generator = _generator(6)
    x = torch.randn(1000, generator=generator)
    y = torch.randn(1000, generator=generator)
    out = triton_probe.scaled_add(x.to(device), y.to(device), 2.0)
    # x * 2 is exact in float32, so one rounding: the result must equal torch's bit for bit.
    _require(torch.equal(out.cpu(), x * 2.0 + y), "the test kernel returned wrong values")
    return "compiled and ran a test kernel"


# (name, op names routed through the registry, check)
SANITY_CHECKS: tuple[tuple[str, tuple[str, ...], Callable[[str], str]], ...] = (
    ("8-bit quantize/dequantize", ("quantize_blockwise", "dequantize_blockwise"), check_quantize_8bit),
    ("4-bit quantize/dequantize", ("quantize_4bit", "dequantize_4bit"), check_quantize_4bit),
    ("4-bit matmul (gemv_4bit)", ("gemv_4bit",), check_gemv_4bit),
    ("int8 matmul", ("int8_linear_matmul", "int8_scaled_mm"), check_int8_matmul),
    ("8-bit AdamW step", ("optimizer_update_8bit_blockwise",), check_adamw_8bit),
)


def implementation(op_names: tuple[str, ...], device: str, backend: dict) -> str:
    """``"triton"``, ``"reference"`` or ``"triton+reference"``: what serves these ops on ``device``."""
    device_type = device.split(":")[0]
    kernels = set(backend.get("ops_with_triton_kernels", ()))
    routed = device_type in backend.get("triton_device_types", ())
    kinds = {"triton" if routed and name in kernels else "reference" for name in op_names}
    return "+".join(sorted(kinds, reverse=True))


def _warm_up() -> None:
    """One tiny untimed op: PyTorch's first custom-op call imports its compiler stack (seconds)."""
    from .. import functional as F

    try:
        F.int8_vectorwise_dequant(torch.ones(1, 1, dtype=torch.int8), torch.ones(1))
    except Exception:  # noqa: BLE001 - a real failure shows up, timed, in the checks themselves
        pass


def run_sanity_checks(devices: list[str], backend: dict) -> list[CheckResult]:
    """Every check in SANITY_CHECKS on every device, device by device (after an untimed warm-up)."""
    _warm_up()
    return [
        run_check(name, device, check, implementation(op_names, device, backend))
        for device in devices
        for name, op_names, check in SANITY_CHECKS
    ]


def triton_compile_check(gpu: device_info.GpuInfo, triton: dict, rocm: bool) -> CheckResult:
    """Whether Triton compiles and runs a kernel on ``gpu`` (SKIP for GPUs Triton does not support)."""
    name = "Triton compile and run"
    if not rocm and not device_info.triton_supports_capability(gpu.capability):
        need = "sm_{}{}".format(*device_info.MIN_TRITON_CAPABILITY)
        return CheckResult(name, gpu.device, SKIP, 0.0, f"not available: {gpu.arch} is older than {need}",
                           hint="tritonbits runs the PyTorch reference here; TRITONBITS_BACKEND=torch makes it explicit.")  # fmt: skip
    if not triton["importable"]:
        error = triton["import_error"] or "not installed"
        return CheckResult(name, gpu.device, FAIL, 0.0, "Triton is not importable", error, hint_for_failure(
            "no module named 'triton'"))  # fmt: skip
    result = run_check(name, gpu.device, check_triton_kernel, "triton")
    if result.status == FAIL and not result.detail:
        result.detail = "could not compile or run the test kernel"
    return result
