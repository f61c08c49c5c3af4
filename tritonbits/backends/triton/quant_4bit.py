"""Triton kernels for blockwise 4-bit NF4/FP4 quantization.

Format and code choice are those of ``backends/torch/quant_4bit.py`` (bit-identical): a float32
absmax per block of ``blocksize`` (32..4096) elements, one 4-bit code per element, two codes per
byte with the first element in the high nibble, the bytes reinterpreted as ``quant_storage``.

The quantize kernel reads each block once and writes packed bytes directly. Codes come from
counting the float32 decision thresholds (midpoints of the table) below the scaled value: 15
compares for NF4, 7 on the magnitude for FP4, all against values held in registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..._ops import num_blocks
from ...codebooks import get_4bit_type
from ..torch.quant_4bit import _thresholds
from . import cast_rtne, interpreting

# Elements one quantize program handles (several blocks when blocks are small).
_TILE = 4096
# Packed bytes one dequantize program decodes (twice as many output elements).
_DEQUANT_BYTES = 2048


@triton.jit
def _quantize_4bit_kernel(
    a_ptr,
    thresholds_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    n_blocks,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    FP4: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    # Masked lanes read 0.0, which encodes to the zero code: that pads an odd last byte.
    x = tl.load(a_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    # Clamping to float32 tiny (2**-126) makes all-zero blocks give zeros instead of NaN.
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, 1.1754943508222875e-38))
    scaled = x * inverse[:, None]

    # code = number of thresholds t with not (value <= t), i.e. torch.bucketize(value, t).
    if FP4:
        magnitude = tl.abs(scaled)
        rank = tl.zeros(scaled.shape, tl.int32)
        for j in tl.static_range(7):
            rank += 1 - (magnitude <= tl.load(thresholds_ptr + j)).to(tl.int32)
        # Magnitude rank 0..7 -> FP4 bits (0, 1, 6, 7, 4, 5, 2, 3); bit 3 is the sign.
        code = tl.where(rank < 2, rank, 8 - (rank & 6) + (rank & 1))
        code = code | ((scaled < 0).to(tl.int32) << 3)
    else:
        code = tl.zeros(scaled.shape, tl.int32)
        for j in tl.static_range(15):
            code += 1 - (scaled <= tl.load(thresholds_ptr + j)).to(tl.int32)

    high, low = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM, BLOCKSIZE // 2, 2]))
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_offsets, packed, mask=byte_offsets < n_bytes)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    table_ptr,
    absmax_ptr,
    out_ptr,
    n,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BYTES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    byte_offsets = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    packed = tl.load(packed_ptr + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
    # The 16-entry table is 64 bytes: one cache line, so these gathers stay cheap.
    high = tl.load(table_ptr + (packed >> 4))
    low = tl.load(table_ptr + (packed & 0xF))
    values = tl.reshape(tl.join(high, low), [2 * BYTES])  # element order: high, low, high, low, ...

    offsets = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    mask = offsets < n
    scale = tl.load(absmax_ptr + offsets // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, cast_rtne(values * scale, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@lru_cache(maxsize=None)
def _device_thresholds(quant_type: str, device: torch.device) -> torch.Tensor:
    return _thresholds(quant_type).to(device=device, dtype=torch.float32).contiguous()


@lru_cache(maxsize=None)
def _device_table(quant_type: str, device: torch.device) -> torch.Tensor:
    return get_4bit_type(quant_type, device=device).to(torch.float32).contiguous()


def quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (float16/bfloat16/float32, any shape) -> (packed codes [rows, 1] of quant_storage, float32 absmax).

    ``rows = (n + 1) // (2 * itemsize)``: a final partial word is dropped, as in the reference.
    """
    n = A.numel()
    words = (n + 1) // (2 * quant_storage.itemsize)
    n_bytes = words * quant_storage.itemsize
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    if n > 0:
        blocks_per_program = min(max(1, _TILE // blocksize), triton.next_power_of_2(absmax.numel()))
        grid = (triton.cdiv(absmax.numel(), blocks_per_program),)
        _quantize_4bit_kernel[grid](
            A.contiguous(),
            _device_thresholds(quant_type, A.device),
            packed,
            absmax,
            n,
            absmax.numel(),
            n_bytes,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            FP4=quant_type == "fp4",
            num_warps=4,
        )
    return packed.view(quant_storage).view(words, 1), absmax


def dequantize_4bit(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes (any quant_storage) -> values of ``shape`` in ``dtype`` (``table[code] * absmax`` in float32)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=A.device)
    n = out.numel()
    if n == 0:
        return out
    packed = A.contiguous().reshape(-1).view(torch.uint8)
    n_bytes = min(packed.numel(), (n + 1) // 2)
    grid = (triton.cdiv((n + 1) // 2, _DEQUANT_BYTES),)
    _dequantize_4bit_kernel[grid](
        packed,
        _device_table(quant_type, A.device),
        absmax.to(torch.float32).contiguous(),
        out,
        n,
        n_bytes,
        BLOCKSIZE=blocksize,
        BYTES=_DEQUANT_BYTES,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return out
