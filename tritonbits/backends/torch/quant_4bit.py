"""Reference blockwise 4-bit NF4/FP4 quantization (float32 math, any device).

Format (bitsandbytes'): blocks of ``blocksize`` elements of the flattened input, one float32
absmax per block, one 4-bit code per element. Two codes share a byte, the first element in the
high nibble. The bytes form a ``[n_bytes / itemsize, 1]`` tensor of ``quant_storage`` words.

Code choice matches bitsandbytes' CUDA kernels: NF4 takes the nearest table value (ties to the
smaller); FP4 takes its sign bit from ``x < 0`` and the nearest magnitude, so a tiny negative
value becomes "-0" (code 8) and exact zero "+0" (code 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ..._ops import register_reference
from ...codebooks import get_4bit_type
from .quant_blockwise import normalize_by_block, scale_by_block

# FP4 magnitude codes (bits 0-2) in increasing order of value: 0, 0.0625, 2, 3, 4, 6, 8, 12.
_FP4_CODES_BY_MAGNITUDE = (0, 1, 6, 7, 4, 5, 2, 3)


@lru_cache(maxsize=None)
def _thresholds(quant_type: str) -> torch.Tensor:
    """Decision thresholds on x/absmax (float32 midpoints between neighbouring values)."""
    table = get_4bit_type(quant_type)
    if quant_type == "nf4":
        levels = table  # already ascending
    else:
        levels = table[list(_FP4_CODES_BY_MAGNITUDE)]
    return (levels[:-1] + levels[1:]) / 2


def encode_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Normalized float32 values -> 4-bit codes (uint8, one per element)."""
    thresholds = _thresholds(quant_type).to(scaled.device)
    if quant_type == "nf4":
        return torch.bucketize(scaled, thresholds).to(torch.uint8)
    magnitude_rank = torch.bucketize(scaled.abs(), thresholds)
    magnitude = torch.tensor(_FP4_CODES_BY_MAGNITUDE, dtype=torch.uint8, device=scaled.device)[magnitude_rank]
    return magnitude | (scaled < 0).to(torch.uint8) << 3


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n] -> bytes [ceil(n / 2)], first code in the high nibble, odd tail padded with 0."""
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)
    return pairs[:, 0] << 4 | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Bytes -> the first ``n`` 4-bit codes (int64), high nibble first."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()


def zero_code(quant_type: str) -> int:
    """The code whose value is 0.0, used to fill a partial last byte."""
    return 7 if quant_type == "nf4" else 0


@register_reference("quantize_4bit")
def quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (float16/bfloat16/float32, any shape) -> (packed codes [rows, 1] of quant_storage, absmax float32)."""
    scaled, absmax = normalize_by_block(A.reshape(-1).float(), blocksize)
    codes = encode_4bit(scaled, quant_type)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), zero_code(quant_type))])
    packed = pack_nibbles(codes)
    words = packed.numel() // quant_storage.itemsize
    return packed[: words * quant_storage.itemsize].view(quant_storage).view(words, 1), absmax


@register_reference("dequantize_4bit")
def dequantize_4bit(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes (any quant_storage) -> values of ``shape`` in ``dtype`` (float32 math)."""
    table = get_4bit_type(quant_type, device=A.device)
    return _decode(A, absmax, table, blocksize, shape).to(dtype)


def _decode(A, absmax, table, blocksize: int, shape: Sequence[int]) -> torch.Tensor:
    n = 1
    for size in shape:
        n *= size
    codes = unpack_nibbles(A.reshape(-1).view(torch.uint8), n)
    return scale_by_block(table.float()[codes], absmax.float(), blocksize).view(*shape)


@register_reference("gemv_4bit")
def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """``A @ W.T`` where W [N, K] = 4-bit B decoded through ``code`` (the 16-entry table).

    A is [..., K] in float16/bfloat16/float32; the output is [..., N] in A's dtype. W is
    decoded in float32 and rounded to A's dtype before the product, as bitsandbytes does.
    """
    weight = _decode(B, absmax, code.to(B.device), blocksize, shapeB).to(A.dtype)
    return torch.nn.functional.linear(A, weight)
