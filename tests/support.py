"""Helpers shared by the tests (importable as ``support``: pyproject puts tests/ on the path)."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Unit roundoff of each dtype (half an ulp at 1.0).
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def assert_close_to(actual, expected64, dtype, magnitude64=None, k=1):
    """|actual - expected| within the rounding of a ``dtype`` matmul.

    Two roundings to ``dtype`` (the product, then the bias add) cost ``eps * (|expected| +
    magnitude)``; a float32 accumulation over k terms adds ``sqrt(k) * eps32 * magnitude``, where
    ``magnitude = |A| @ |W|.T + |bias|`` bounds the partial sums (cancellation included).
    """
    if magnitude64 is None:
        magnitude64 = expected64.abs()
    eps = EPS[dtype]
    bound = 2 * eps * (expected64.abs() + magnitude64) + 4 * k**0.5 * EPS[torch.float32] * magnitude64
    error = (actual.double() - expected64).abs()
    assert actual.shape == expected64.shape
    assert bool((error <= bound).all()), (
        f"max error {error.max().item():.3g}, bound there {bound.flatten()[error.argmax()].item():.3g}"
    )


def assert_same_decoding(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values; for float16, within one unit in the last place: bitsandbytes' AVX-512 CPU path
    rounds float32 -> float16 differently from torch (seen on the H100 host's CPU, 2026-11-24)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == torch.float16:
        torch.testing.assert_close(a, b, rtol=2**-10, atol=0)
    else:
        assert torch.equal(a, b)


@functools.lru_cache(maxsize=None)
def bnb_cpu_4bit_inexact() -> Optional[str]:
    """Why bitsandbytes' own CPU 4-bit path cannot serve as the expected value on this machine,
    or None where it can.

    On an AMD EPYC with AVX-512 (bf16, VBMI; 2026-12-03) bitsandbytes 0.50.2 quantizes to the
    same bytes as ours and as the format says, but its CPU ``dequantize_4bit`` of a 2-D weight
    whose rows are not whole blocks (e.g. [10, 96] in blocks of 64) gives other values (errors
    of ~1 on N(0, 1) weights), and its CPU Linear4bit outputs differ from its own decoded weight
    times the input; on the CPUs of earlier runs both agreed. Tests that compare against
    bitsandbytes' CPU outputs skip with this reason there.
    """
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return "bitsandbytes is not installed"
    from tritonbits.backends.torch.quant_4bit import dequantize_4bit

    dense = torch.randn(10, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4")
    decoded = dequantize_4bit(packed, state.absmax, 64, "nf4", dense.shape, torch.float32)  # the format's decoding
    if not torch.equal(bnbF.dequantize_4bit(packed, state), decoded):
        return "bitsandbytes' CPU dequantize_4bit on this CPU does not decode its own bytes as the format says"
    return None


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (monkeypatched for the test) so that every call appends to the list
    returned; the wrapped function still runs."""
    real = getattr(module, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls
