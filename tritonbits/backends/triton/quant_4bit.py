"""Triton kernels for blockwise 4-bit NF4/FP4 quantization.

Format and code choice are those of ``backends/torch/quant_4bit.py`` (bit-identical): a float32
absmax per block of ``blocksize`` (32..4096) elements, one 4-bit code per element, two codes per
byte with the first element in the high nibble, the bytes reinterpreted as ``quant_storage``.

The quantize kernel reads each block once and writes packed bytes directly. Codes come from a
table of 1/32-wide buckets of the scaled value, each entry holding the bucket's threshold and
its two codes (one lookup and one compare per element: see the kernel and ``_bucket_entries``).
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
from ...quant_state import QuantState
from . import cast_rtne, half_of_word, interpreting
from .kept_launch import KeptLaunch, kept_launch

# Elements one quantize program handles (several blocks when blocks are small), its warps, and
# whether its code table is gathered from shared memory (else from global memory, through L1).
# tests/gpu/tune_quant4.py on an H200 (2026-12-03, 8192x8192 bf16): the shared-memory table
# takes the kernel from 0.092-0.095 ms to 0.063 ms at every tile size; tile 4096, 4 warps is
# the fastest (0.0627 ms, 64% of the copy bandwidth; ~20 instructions per element by an offline
# sm_90 compile, against ~37 for the kernel before the one-entry table).
_TILE = 4096
_QUANT_WARPS = 4
_SHARED_TABLE = True
# The shared-memory table as two of int32 words: float32 thresholds and both codes of a bucket
# (two 32-bit gathers instead of one 64-bit one, whose 8-byte entries put buckets b and b + 16 on
# the same banks; about 23.3 instructions an element against 22.0 by an offline sm_90 compile).
# Off until timed on a GPU (tests/gpu/tune_quant4.py sweeps it).
_SPLIT_TABLE = False
# 16-bit A read as int32 words of two values (see the kernel): 17.0 instructions an element
# against 20.75 by an offline sm_90 compile (Triton 3.6; bf16, blocksize 64, 8192x8192, no masks:
# 22.0 with them). Off until timed on a GPU (tests/gpu/tune_quant4.py sweeps it).
_PAIRS = False
# Output elements one dequantize program writes, and its warps.
_DEQUANT_ELEMENTS = 4096
_DEQUANT_WARPS = 4
# Dequantize options (see the kernel), off until timed on a GPU (tests/gpu/tune_quant4.py sweeps
# them): bytes a thread holds in a run (0: the 2-D tiles), and the table gathered from shared
# memory. Offline sm_90 compile (Triton 3.6, bf16, blocksize 64, whole tiles): 11.5 instructions
# an element today (12.25 with masks), 8.25 with runs of 4 bytes and the shared-memory table.
_DEQUANT_VEC = 0
_DEQUANT_SHARED_TABLE = False


@triton.jit
def _floor_to_int(x, INTERPRET: tl.constexpr):
    """floor(x) as int32 in one conversion (``cvt.rmi``; NaN gives 0). The interpreter has no
    inline assembly: there NaN is mapped to 0 explicitly (numpy's cast would give INT_MIN)."""
    if INTERPRET:
        return tl.where(x == x, tl.math.floor(x), 0.0).to(tl.int32)
    else:
        return tl.inline_asm_elementwise("cvt.rmi.s32.f32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _entry_words(entry):
    """A bucket entry (int64, see _bucket_entries) -> (float32 threshold, int32 code pair)."""
    return (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True), (entry >> 32).to(tl.int32)


@triton.jit
def _quantize_4bit_kernel(
    a_ptr,
    bucket_ptr,
    threshold_ptr,
    pair_codes_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    n_blocks,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    SHARED_TABLE: tl.constexpr,
    INTERPRET: tl.constexpr,
    SPLIT_TABLE: tl.constexpr = False,
    PAIRS: tl.constexpr = False,
    EVEN: tl.constexpr = False,
):
    # EVEN: n is a multiple of the program's tile, so nothing is masked. PAIRS (16-bit A, n
    # even): A read as int32 words of two values, each converted with integer operations, which
    # also gives a thread whole runs of a row (fewer rows a thread: fewer divisions and shuffles).
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    if PAIRS:
        half_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        word_ptrs = a_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + half_offsets
        if EVEN:
            words = tl.load(word_ptrs)
        else:
            words = tl.load(word_ptrs, mask=half_offsets < n // 2, other=0)
        dtype = a_ptr.dtype.element_ty
        pair = tl.join(half_of_word(words, 0, dtype), half_of_word(words, 1, dtype))
        x = tl.reshape(pair, [BLOCKS_PER_PROGRAM, BLOCKSIZE])
    else:
        offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if EVEN:
            x = tl.load(a_ptr + offsets).to(tl.float32)
        else:
            # Masked lanes read 0.0, which encodes to the zero code: that pads an odd last byte.
            x = tl.load(a_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    if EVEN:
        tl.store(absmax_ptr + blocks, absmax)
    else:
        tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    # Clamping to float32 tiny (2**-126) makes all-zero blocks give zeros instead of NaN.
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, 1.1754943508222875e-38))
    # value = 32 * x / absmax (the power of two is exact) lies in [-32 - 2**-18, 32 + 2**-18]:
    # its floor picks one of the 66 buckets of width 1/32 in x / absmax, and each bucket holds
    # at most one decision threshold. A bucket's int64 entry (see _bucket_entries) carries that
    # threshold (times 32) in its low word and, in its high word, the code below it (byte 0)
    # and above it (byte 1): one gather and one compare per element, for NF4 and FP4 alike.
    value = x * inverse[:, None] * 32.0
    bucket = _floor_to_int(value, INTERPRET)
    if SHARED_TABLE:
        # the 66 entries as register tensors: Triton stages each in shared memory for its gather
        flat = tl.reshape(bucket + 33, [BLOCKS_PER_PROGRAM * BLOCKSIZE])
        i = tl.arange(0, 128)
        if SPLIT_TABLE:  # the entries' two words as two tables: float32 thresholds, int32 codes
            thresholds = tl.load(threshold_ptr + i, mask=i < 66, other=0.0)
            pair_codes = tl.load(pair_codes_ptr + i, mask=i < 66, other=0)
            threshold = tl.reshape(tl.gather(thresholds, flat, 0), [BLOCKS_PER_PROGRAM, BLOCKSIZE])
            codes = tl.reshape(tl.gather(pair_codes, flat, 0), [BLOCKS_PER_PROGRAM, BLOCKSIZE])
        else:
            table = tl.load(bucket_ptr + i, mask=i < 66, other=0)
            entry = tl.reshape(tl.gather(table, flat, 0), [BLOCKS_PER_PROGRAM, BLOCKSIZE])
            threshold, codes = _entry_words(entry)
    else:
        threshold, codes = _entry_words(tl.load(bucket_ptr + 33 + bucket))  # the offset folds into the address
    code = (codes >> tl.where(value > threshold, 8, 0)) & 15

    high, low = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM, BLOCKSIZE // 2, 2]))
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    if EVEN:
        tl.store(packed_ptr + byte_offsets, packed)
    else:
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
    VEC: tl.constexpr = 0,
    SHARED_TABLE: tl.constexpr = False,
    EVEN: tl.constexpr = False,
):
    # A [BLOCKS_PER_PROGRAM, BLOCKSIZE] tile of the output: one absmax load per row.
    # Options, off until timed on a GPU: VEC > 0, the bytes a thread holds in a run
    # ([blocks, runs, VEC] bytes with each byte's two values joined last, so that the loads, the
    # decode and the store share one layout; with 2-D tiles Triton converts between the bytes'
    # and the output's layouts through shared memory); SHARED_TABLE, the 16 values gathered from
    # shared memory (32-bit addresses) instead of global memory; EVEN, a whole tile (no masks).
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    if VEC > 0:
        byte_cols = tl.arange(0, BLOCKSIZE // 2 // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        byte_offsets = blocks[:, None, None] * (BLOCKSIZE // 2) + byte_cols[None, :, :]
    else:
        byte_offsets = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    if EVEN:
        packed = tl.load(packed_ptr + byte_offsets).to(tl.int32)
    else:
        packed = tl.load(packed_ptr + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
    if SHARED_TABLE:
        table = tl.load(table_ptr + tl.arange(0, 16))
        flat = tl.reshape(packed, [packed.numel])
        high = tl.reshape(tl.gather(table, flat >> 4, 0), packed.shape)
        low = tl.reshape(tl.gather(table, flat & 0xF, 0), packed.shape)
    else:
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
    if VEC > 0:
        RUNS: tl.constexpr = BLOCKSIZE // 2 // VEC
        pairs = tl.join(high, low)  # [blocks, runs, VEC, 2]
        values = tl.reshape(pairs, [BLOCKS_PER_PROGRAM, RUNS, 2 * VEC]) * scale[:, None, None]
        offsets = blocks[:, None, None] * BLOCKSIZE + (tl.arange(0, RUNS)[:, None] * (2 * VEC)
                                                       + tl.arange(0, 2 * VEC)[None, :])[None, :, :]  # fmt: skip
    else:
        values = tl.reshape(tl.join(high, low), [BLOCKS_PER_PROGRAM, BLOCKSIZE]) * scale[:, None]
        offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out = cast_rtne(values, out_ptr.dtype.element_ty, INTERPRET)
    if EVEN:
        tl.store(out_ptr + offsets, out)
    else:
        tl.store(out_ptr + offsets, out, mask=offsets < n)


def _ordered(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> int64 keys in the order of the values (-0 and +0 both 0)."""
    bits = values.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 2**31, 2**31 - bits, bits)


def _from_ordered(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ordered` (0 maps to +0): float32 values."""
    bits = torch.where(keys < 0, 2**31 - keys, keys)
    return bits.to(torch.int64).to(torch.int32).view(torch.float32)


@lru_cache(maxsize=None)
def _bucket_entries(quant_type: str) -> torch.Tensor:
    """The quantize kernel's table: one int64 entry per bucket b = -33 .. 32 of
    ``value = 32 * x / absmax`` (b <= value < b + 1), at index b + 33.

    Low word: the float32 bits of the largest value in the bucket that still takes the bucket's
    first code (+inf if the whole bucket does); high word: that first code in byte 0 and the
    code above the threshold in byte 1. Derived from the reference encoder, by bisection on the
    float32 values of each bucket, so the kernel's ``value > threshold`` reproduces its codes
    and tie rules exactly (NF4 ``x > t``; FP4 ``|x| > t`` with the sign from ``x < 0``). Fails
    if a bucket held more than one change of code.
    """
    from ..torch.quant_4bit import encode_4bit

    def codes_at(keys: torch.Tensor) -> torch.Tensor:  # ordered keys of x / absmax -> codes
        return encode_4bit(_from_ordered(keys), quant_type).long()

    # bisection on the float32 values of x / absmax in [b / 32, (b + 1) / 32), so that every
    # value is one the kernel sees (value = 32 * x / absmax exactly)
    starts = torch.arange(-33, 33, dtype=torch.float32) / 32
    lo, hi = _ordered(starts), _ordered(starts + 1 / 32) - 1
    first, last = codes_at(lo), codes_at(hi)
    a, b = lo.clone(), hi.clone()  # codes_at(a) == first; b: the first key with another code
    while bool(((b - a) > 1).any()):
        mid = (a + b) // 2
        same = codes_at(mid) == first
        a, b = torch.where(same, mid, a), torch.where(same, b, mid)
    changes = first != last
    threshold = torch.where(changes, _from_ordered(a) * 32, torch.tensor(float("inf")))
    above = torch.where(changes, codes_at(b), first)
    # one change at most per bucket: from b on, the code is the bucket's last one
    if bool((changes & (above != last)).any()):
        raise AssertionError(f"{quant_type}: a bucket holds more than one change of code")
    bits = threshold.view(torch.int32).long() & 0xFFFFFFFF
    return bits | ((first | above << 8) << 32)


@lru_cache(maxsize=None)
def _bucket_table(quant_type: str, device: torch.device) -> torch.Tensor:
    return _bucket_entries(quant_type).to(device)


@lru_cache(maxsize=None)
def _split_bucket_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_bucket_entries`' two words as tables [66]: float32 thresholds and int32 code
    pairs (the code below the threshold in byte 0, the code above it in byte 1)."""
    entries = _bucket_entries(quant_type)
    thresholds = (entries & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return thresholds.to(device), (entries >> 32).to(torch.int32).to(device)


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
        table = _bucket_table(quant_type, A.device)
        thresholds, pair_codes = _split_bucket_tables(quant_type, A.device) if _SPLIT_TABLE else (table, table)
        pairs = _PAIRS and A.dtype in (torch.bfloat16, torch.float16) and n % 2 == 0
        _quantize_4bit_kernel[grid](
            A.contiguous(),
            table,
            thresholds,
            pair_codes,
            packed,
            absmax,
            n,
            absmax.numel(),
            n_bytes,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            SHARED_TABLE=_SHARED_TABLE,
            INTERPRET=interpreting(),
            SPLIT_TABLE=_SPLIT_TABLE,
            PAIRS=pairs,
            EVEN=n % (blocks_per_program * blocksize) == 0,
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
            VEC=min(_DEQUANT_VEC, blocksize // 2),
            SHARED_TABLE=_DEQUANT_SHARED_TABLE,
            EVEN=self.n % (blocks_per_program * blocksize) == 0 and packed.numel() * 2 >= self.n,
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
