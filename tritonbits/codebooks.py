"""Quantization codebooks ("codes", "quant maps"): the value each integer code stands for.

Every table here is bit-identical to the one bitsandbytes 0.50.2 builds, because the tables are
part of the serialized format: a checkpoint stores codes, and the reader maps them back through
the same table. All tables are float32 and normalized so that their largest magnitude is 1.0.

- 4-bit tables (`get_4bit_type`) have 16 entries, indexed by the 4-bit code.
- 8-bit tables (`create_*_map`) have 256 entries, sorted ascending, indexed by the 8-bit code.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

__all__ = [
    "NF4_VALUES",
    "FP4_VALUES",
    "get_4bit_type",
    "create_dynamic_map",
    "create_normal_map",
    "create_linear_map",
    "create_fp8_map",
    "dynamic_map",
    "cached_table",
]

# NormalFloat4 (QLoRA): equal-probability quantiles of N(0, 1), normalized to [-1, 1].
# Equal to create_normal_map(0.9677083, use_extra_value=True) with its 241 padding zeros removed.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1, exponent bias 2), listed in code order: bit 3 is the sign, bits 0-2 the magnitude.
# The magnitudes are 0, 0.0625, 8, 12, 4, 6, 2, 3 before normalization by 12.
_FP4_UNNORMALIZED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_VALUES = tuple(v / 12.0 for v in _FP4_UNNORMALIZED)

_INT4_UNNORMALIZED = (7, 6, 5, 4, 3, 2, 1, 0, -0, -1, -2, -3, -4, -5, -6, -7)

# AbnormalFloat4 for blocksize 64 ("NF4 Isn't Information Theoretically Optimal"), stored reversed.
_AF4_BS64 = (
    -1.0,
    -0.69441008,
    -0.51243739,
    -0.3736951,
    -0.25607552,
    -0.14982478,
    -0.04934812,
    0.0,
    0.04273164,
    0.12934483,
    0.21961274,
    0.31675666,
    0.42563882,
    0.55496234,
    0.72424863,
    1.0,
)[::-1]


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type, indexed by code.

    Args:
        typename: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"af4"`` (af4 only for blocksize 64).
        device: where the table lives. bitsandbytes defaults to ``"cuda"``; here ``None`` means
            the CPU, so the call works on machines without a GPU.
        blocksize: only used by ``"af4"``.
    """
    if typename == "nf4":
        data = NF4_VALUES
    elif typename == "fp4":
        data = _FP4_UNNORMALIZED
    elif typename == "int4":
        data = _INT4_UNNORMALIZED
    elif typename == "af4":
        if blocksize != 64:
            raise NotImplementedError("4-bit AbnormalFloats currently only support blocksize 64.")
        data = _AF4_BS64
    else:
        raise NotImplementedError(f"Typename {typename} not supported")
    table = torch.tensor(data, dtype=torch.float32, device=device)
    return table.div_(table.abs().max())


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """A 256-entry evenly spaced table over [-1, 1] (signed) or [0, 1]; fewer bits pad with zeros."""
    low = -1.0 if signed else 0.0
    count = 2**total_bits
    if (add_zero or total_bits < 8) and signed:
        count -= 1  # keep an exact zero in the middle by giving up one level
    values = torch.linspace(low, 1.0, count)
    gap = 256 - values.numel()
    if gap == 0:
        return values
    half = values.numel() // 2
    return torch.cat([values[:half], torch.zeros(gap), values[half:]])


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat table: normal quantiles between ``1 - offset`` and ``offset``.

    Returns 256 sorted float32 values whose non-zero part is 15 values (``use_extra_value``:
    8 positive, 7 negative, plus zero) or 14, normalized so the largest is 1. Quantiles come
    from ``torch.special.ndtri`` in float64, so scipy is not needed.
    """
    positive_points = 9 if use_extra_value else 8
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, positive_points)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    nonzero = positive.numel() + negative.numel()
    values = torch.cat([positive.float(), torch.zeros(256 - nonzero), negative.float()])
    values = values.sort().values
    return values / values.max()


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A table of every value of a small float format (e.g. e4m3, or e2m1 for FP4), sorted.

    The exponent bias is ``2**(exponent_bits - 1)``; exponent field 0 holds subnormals. Formats
    narrower than 8 bits are padded with zeros to 256 entries. Normalized so the largest is 1.
    """
    if exponent_bits + precision_bits != total_bits - (1 if signed else 0):
        raise ValueError(
            f"exponent_bits ({exponent_bits}) + precision_bits ({precision_bits}) must equal "
            f"total_bits ({total_bits}) minus the sign bit"
        )
    bias = 2 ** (exponent_bits - 1)
    values = []
    for exponent in range(2**exponent_bits):
        for mantissa_bits in itertools.product((0, 1), repeat=precision_bits):
            mantissa = sum(bit * 2.0 ** -(i + 1) for i, bit in enumerate(mantissa_bits))
            if exponent == 0:
                value = mantissa * 2.0**-bias
            else:
                value = (1.0 + mantissa) * 2.0 ** -(exponent - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values += [0.0] * (256 - len(values))
    code = torch.tensor(sorted(values))
    return code / code.max()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic tree quantization table (Dettmers 2015) used by 8-bit optimizers and blockwise 8-bit.

    Each decade ``10**-k`` gets a linear grid of fraction values; larger decades get more of them.
    Returns ``2**total_bits`` values padded with zeros to 256, sorted ascending, float32.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
        data += _decade_means(i, max_exponent_bits, fraction_items, signed)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional_items > 0:
        data += _decade_means(max_exponent_bits - 1, max_exponent_bits, additional_items + 1, signed)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map has {len(data)} values, expected {2**total_bits}")
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _decade_means(i: int, max_exponent_bits: int, points: int, signed: bool) -> list[float]:
    """Midpoints of a float32 grid over [0.1, 1], scaled into decade ``10**(i - max_exponent_bits + 1)``."""
    grid = torch.linspace(0.1, 1, points, dtype=torch.float32)
    means = (grid[:-1] + grid[1:]) / 2.0
    scale = 10 ** (-(max_exponent_bits - 1) + i)
    out = (scale * means).tolist()
    if signed:
        out += (-scale * means).tolist()
    return out


@lru_cache(maxsize=None)
def cached_table(name: str, device: torch.device) -> torch.Tensor:
    """A table kept on ``device`` for the library's own use; never modify it in place.

    ``name``: ``"nf4"``, ``"fp4"``, ``"dynamic"`` or ``"dynamic_unsigned"``. Caching matters on GPUs:
    building a table on the host and copying it over on every call would stall the stream.
    """
    if name == "dynamic":
        table = create_dynamic_map(signed=True)
    elif name == "dynamic_unsigned":
        table = create_dynamic_map(signed=False)
    else:
        table = get_4bit_type(name)
    return table.to(device)


def dynamic_map(device=None, signed: bool = True) -> torch.Tensor:
    """The default 8-bit code (signed dynamic map) on ``device``: a copy the caller may keep."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return cached_table("dynamic" if signed else "dynamic_unsigned", device).clone()
