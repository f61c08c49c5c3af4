"""Triton kernels and their launchers, one file per op family (mirrors ``backends/torch``).

Each launcher has the name and signature of the reference it replaces, returns bit-identical
results, and is looked up through ``backends.registry.TRITON_KERNELS``; Triton is imported only
when one of these modules is. Conventions shared by every kernel here:

- Offsets are computed in int64 from the program id, so tensors past 2**31 elements index right.
- Every load and store is masked at the tail; empty inputs return before launching.
- Inputs are made contiguous in the launcher; outputs are always contiguous.
- Division uses ``tl.math.div_rn`` (IEEE round-to-nearest) because ``/`` on float32 compiles to
  an approximate division on NVIDIA GPUs, which would change codes near decision thresholds.
- Rounding to integers is half-to-even (:func:`round_half_even`), as ``torch.round``.
- Float32 results are rounded to the output dtype to nearest-even, as torch does (see
  :func:`cast_rtne`: the interpreter truncates when casting to bfloat16).
"""

from __future__ import annotations

import os
import warnings

import triton
import triton.language as tl
from triton.language.extra import libdevice

_warned: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def warn_once(key: str, message: str) -> None:
    """``warnings.warn`` a degraded path once per process and key."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``x`` -> ``dtype``, rounding to nearest-even like torch's ``.to(dtype)``.

    Compiled kernels use the hardware conversion (round-to-nearest-even). Triton's interpreter
    truncates float32 -> bfloat16, so there the rounding is done on the bits: add 0x7FFF plus
    the lowest kept bit, then drop the low 16 bits (exact for every finite value and infinity).
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def round_half_even(x, INTERPRET: tl.constexpr):
    """float32 ``x`` rounded to the nearest integer, ties to even (``torch.round``), as float32.

    Compiled kernels call libdevice ``rint`` (one exact conversion instruction). The interpreter's
    libdevice has no ``rint``, so there the 1.5 * 2**23 trick is used: adding it leaves no
    fraction bits, so the float32 addition itself rounds half-to-even (exact for |x| < 2**22).
    The trick is not used on the GPU because the compiler may fuse ``x * scale + c`` into one FMA,
    which would round the unrounded product.
    """
    if INTERPRET:
        return (x + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(x)


@triton.jit
def half_of_word(words, HIGH: tl.constexpr, dtype: tl.constexpr):
    """The first (HIGH 0: the low half, memory being little-endian) or second bfloat16/float16
    value packed in int32 ``words``, as float32 (exact). A bfloat16 is the high half of the
    float32 of the same value: one shift or mask, where the compiler's conversion of a loaded
    bfloat16 pair takes a byte permute and a shift for the high one."""
    if dtype == tl.bfloat16:
        bits = words << 16 if HIGH == 0 else words & -65536
        value = bits.to(tl.float32, bitcast=True)
    else:
        half = (words >> 16 if HIGH == 1 else words).to(tl.int16)
        value = half.to(tl.float16, bitcast=True).to(tl.float32)
    return value
