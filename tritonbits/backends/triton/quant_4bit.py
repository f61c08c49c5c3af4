"""Triton kernels for blockwise 4-bit NF4/FP4 quantization.

Format and code choice are those of ``backends/torch/quant_4bit.py`` (bit-identical): a float32
absmax per block of ``blocksize`` (32..4096) elements, one 4-bit code per element, two codes per
byte with the first element in the high nibble, the bytes reinterpreted as ``quant_storage``.

The quantize kernel reads each block once and writes packed bytes directly. Codes come from
counting the decision thresholds below the scaled value, through a bucket table (one lookup and
one compare per element: see the kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from math import prod
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..._ops import num_blocks
from ...codebooks import get_4bit_type
from ..torch.quant_4bit import _thresholds
from ...quant_state import QuantState
from . import cast_rtne, interpreting
from .kept_launch import KeptLaunch, kept_launch

# Elements one quantize program handles (several blocks when blocks are small), and its warps.
_TILE = 2048
_QUANT_WARPS = 4
# Output elements one dequantize program writes, and its warps.
_DEQUANT_ELEMENTS = 4096
_DEQUANT_WARPS = 4


@triton.jit
def _quantize_4bit_kernel(
    a_ptr,
    bucket_threshold_ptr,
    bucket_base_ptr,
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

    # code = number of thresholds t with scaled > t. Instead of 15 (NF4) or 7 (FP4) compares, look
    # at 1/32-wide buckets of the value: no bucket holds more than one threshold, so the count is
    # "thresholds in the buckets below" (a table) plus one compare with the bucket's own threshold
    # (+inf where it has none). Scaling by 32 is exact, so the compare equals scaled > t.
    if FP4:
        value = tl.abs(scaled) * 32.0
        bucket = tl.minimum(tl.math.floor(value), 31.0).to(tl.int32)
    else:
        value = scaled * 32.0
        bucket = tl.minimum(tl.maximum(tl.math.floor(value), -32.0), 31.0).to(tl.int32) + 32
    rank = tl.load(bucket_base_ptr + bucket).to(tl.int32)
    rank += (value > tl.load(bucket_threshold_ptr + bucket)).to(tl.int32)
    if FP4:
        # Magnitude rank 0..7 -> FP4 bits (0, 1, 6, 7, 4, 5, 2, 3); bit 3 is the sign.
        code = tl.where(rank < 2, rank, 8 - (rank & 6) + (rank & 1))
        code = code | ((scaled < 0).to(tl.int32) << 3)
    else:
        code = rank

    high, low = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM, BLOCKSIZE // 2, 2]))
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_offsets, packed, mask=byte_offsets < n_bytes)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    table_ptr,
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    offset_ptr,
    out_ptr,
    n,
    n_bytes,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    ABSMAX_BLOCKSIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # A [BLOCKS_PER_PROGRAM, BLOCKSIZE] tile of the output: one absmax load per row.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    byte_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    packed = tl.load(packed_ptr + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
    # The 16-entry table is 64 bytes: one cache line, so these gathers stay cheap.
    high = tl.load(table_ptr + (packed >> 4))
    low = tl.load(table_ptr + (packed & 0xF))
    if NESTED:
        # 8-bit absmax codes decoded as the reference does, ``code[q] * scale[block // 256]``
        # then ``+ offset``, each rounded once: mul_rn/add_rn keep the compiler from fusing them
        # into one FMA (the interpreter computes in numpy float32, separately rounded anyway).
        q = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0).to(tl.int32)
        outer = tl.load(absmax_scale_ptr + blocks // ABSMAX_BLOCKSIZE, mask=blocks < n_blocks, other=0.0)
        inner = tl.load(absmax_code_ptr + q)
        if INTERPRET:
            scale = inner * outer + tl.load(offset_ptr)
        else:
            scale = libdevice.add_rn(libdevice.mul_rn(inner, outer), tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0.0)
    # element order within a row: high, low, high, low, ...
    values = tl.reshape(tl.join(high, low), [BLOCKS_PER_PROGRAM, BLOCKSIZE]) * scale[:, None]
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offsets, cast_rtne(values, out_ptr.dtype.element_ty, INTERPRET), mask=offsets < n)


@lru_cache(maxsize=None)
def _bucket_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1/32-wide bucket of the scaled value (of its magnitude for FP4): the threshold inside
    it times 32 (+inf if none) and the number of thresholds in lower buckets.

    NF4 buckets cover [-1, 1) as 64 buckets, FP4 magnitudes [0, 1) as 32; values outside go to
    the end buckets. Every threshold gap exceeds 1/32, so a bucket holds at most one threshold.
    """
    thresholds32 = _thresholds(quant_type).double() * 32  # exact: float32 values times a power of two
    offset, count = (0, 32) if quant_type == "fp4" else (32, 64)
    buckets = (torch.floor(thresholds32).long() + offset).tolist()
    if len(set(buckets)) != len(buckets) or min(buckets) < 0 or max(buckets) >= count:
        raise AssertionError(f"{quant_type} thresholds do not fit one per bucket: {buckets}")
    threshold = torch.full((count,), float("inf"), dtype=torch.float32)
    threshold[buckets] = thresholds32.float()
    base = torch.zeros(count, dtype=torch.uint8)
    for b in buckets:
        base[b + 1 :] += 1
    return threshold.to(device), base.to(device)


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
            *_bucket_tables(quant_type, A.device),
            packed,
            absmax,
            n,
            absmax.numel(),
            n_bytes,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            FP4=quant_type == "fp4",
            num_warps=_QUANT_WARPS,
        )
    return packed.view(quant_storage).view(words, 1), absmax


def dequantize_4bit(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes (any quant_storage) -> values of ``shape`` in ``dtype`` (``table[code] * absmax`` in float32)."""
    return decode_4bit(A, absmax, _device_table(quant_type, A.device), blocksize, shape, dtype)


def nested_absmax_args(state: QuantState) -> Optional[tuple]:
    """A nested state's (absmax_code, absmax_scale, offset, absmax_blocksize) as the kernels that
    decode 8-bit absmax codes take them (float32, contiguous, offset as [1]); None if not nested."""
    if not state.nested:
        return None
    inner = state.state2
    return nested_args(inner.code, inner.absmax, state.offset, inner.blocksize)


def nested_args(absmax_code, absmax_scale, offset, absmax_blocksize: int) -> tuple:
    """(absmax_code, absmax_scale, offset, absmax_blocksize) in the form the kernels take."""
    return (absmax_code.float().contiguous(), absmax_scale.float().contiguous(), offset.float().reshape(1),
            absmax_blocksize)  # fmt: skip


class DequantLaunch(KeptLaunch):
    """The dequantize kernel's launch for one packed weight: ``launch()`` returns a new tensor of
    ``shape`` in ``dtype``. With ``nested`` = (absmax_code, absmax_scale, offset, absmax_blocksize)
    the kernel decodes 8-bit absmax codes itself, bit-identically to dequantize_blockwise + offset.
    """

    def __init__(self, A: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int,
                 shape: Sequence[int], dtype: torch.dtype, nested=None) -> None:  # fmt: skip
        self.shape, self.dtype, self.device = tuple(shape), dtype, A.device
        self.n = prod(self.shape)
        packed = A.contiguous().reshape(-1).view(torch.uint8)
        n_blocks = num_blocks(self.n, blocksize)
        if nested is None:
            absmax = absmax.to(torch.float32).contiguous()
            absmax_code, absmax_scale, offset, absmax_blocksize = absmax, absmax, absmax, 1
        else:
            absmax = absmax.contiguous()
            absmax_code, absmax_scale, offset, absmax_blocksize = nested
        self.fixed = (packed, table, absmax, absmax_code, absmax_scale, offset)
        self.sizes = (self.n, min(packed.numel(), (self.n + 1) // 2), n_blocks)
        blocks_per_program = min(max(1, _DEQUANT_ELEMENTS // blocksize), triton.next_power_of_2(max(n_blocks, 1)))
        constexprs = dict(
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            NESTED=nested is not None,
            ABSMAX_BLOCKSIZE=absmax_blocksize,
            INTERPRET=interpreting(),
        )
        super().__init__(_dequantize_4bit_kernel, (triton.cdiv(n_blocks, blocks_per_program),), constexprs,
                         _DEQUANT_WARPS)  # fmt: skip

    def launch(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.n:
            self._run((*self.fixed, out, *self.sizes))
        return out


def decode_4bit(
    A: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """:func:`dequantize_4bit` through any 16-entry float32 ``table`` on A's device."""
    return DequantLaunch(A, absmax, table, blocksize, shape, dtype).launch()


def state_dequant_launch(B: torch.Tensor, state: QuantState, dtype: torch.dtype) -> Optional[DequantLaunch]:
    """The dequantize launch of the 4-bit weight (B, state) into ``dtype``, kept on ``state``
    (see ``kept_launch``); None where the state is not one the kernel takes."""

    def build() -> Optional[DequantLaunch]:
        if state.shape is None or state.quant_type not in ("nf4", "fp4") or B.device != state.absmax.device:
            return None
        table = _device_table(state.quant_type, B.device)  # as the op: the quant type's table
        if state.nested and state.absmax.dtype != torch.uint8:
            return None
        return DequantLaunch(B, state.absmax, table, state.blocksize, state.shape, dtype, nested_absmax_args(state))

    return kept_launch(state, ("dequantize_4bit", dtype, B.device), B, build)
