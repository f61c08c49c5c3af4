"""Reference blockwise 4-bit NF4/FP4 quantization (float32 math, any device).

Format (bitsandbytes'): blocks of ``blocksize`` elements of the flattened input, one float32
absmax per block, one 4-bit code per element. Two codes share a byte, the first element in the
high nibble. The bytes form a ``[n_bytes / itemsize, 1]`` tensor of ``quant_storage`` words.

Code choice matches bitsandbytes' CUDA kernels: the nearest table value by their fixed decision
thresholds (below). FP4 takes its sign bit from ``x < 0`` and the nearest magnitude, so a tiny
negative value becomes "-0" (code 8) and exact zero "+0" (code 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ..._ops import register_reference
from ...codebooks import get_4bit_type
from .quant_blockwise import dequantize_blockwise, normalize_by_block, scale_by_block

# FP4 magnitude codes (bits 0-2) in increasing order of value: 0, 0.0625, 2, 3, 4, 6, 8, 12 (then /12).
_FP4_CODES_BY_MAGNITUDE = (0, 1, 6, 7, 4, 5, 2, 3)

# Decision thresholds on x / absmax. They are bitsandbytes' CUDA constants (dQuantizeNF4 and
# dQuantizeFP4 in kernels.cu), not midpoints recomputed here: a few differ from the float32
# midpoint by an ulp or more, and matching them keeps codes bit-identical to checkpoints made on
# GPUs. A value equal to a threshold takes the lower code (the kernels compare with ``x > t``).
NF4_THRESHOLDS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)
# On |x| / absmax; the sign bit comes from x < 0.
FP4_MAGNITUDE_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)


@lru_cache(maxsize=None)
def _thresholds(quant_type: str) -> torch.Tensor:
    """float32 decision thresholds (rounded from the decimal constants, as a C compiler does)."""
    values = NF4_THRESHOLDS if quant_type == "nf4" else FP4_MAGNITUDE_THRESHOLDS
    return torch.tensor(values, dtype=torch.float32)


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


@register_reference("gemv_4bit_nested")
def gemv_4bit_nested(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    offset: torch.Tensor,
    absmax_blocksize: int,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """:func:`gemv_4bit` with a nested absmax: uint8 codes ``absmax`` of the 256-entry
    ``absmax_code``, float32 ``absmax_scale`` per ``absmax_blocksize`` codes, plus ``offset``.

    The absmax is decoded as ``dequantize_blockwise(absmax) + offset`` in float32, as
    ``functional.dequantize_4bit`` does for nested states.
    """
    decoded = dequantize_blockwise(absmax, absmax_scale.float(), absmax_code, absmax_blocksize, torch.float32)
    return gemv_4bit(A, B, shapeB, decoded + offset.to(torch.float32), code, blocksize)
