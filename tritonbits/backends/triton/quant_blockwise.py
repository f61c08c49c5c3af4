"""Triton kernels for blockwise 8-bit quantization with any 256-entry code.

Format and rounding are those of ``backends/torch/quant_blockwise.py`` (bit-identical): blocks of
``blocksize`` elements of the flattened input, a float32 absmax per block, and per element the
index of the code entry nearest to ``x * (1 / absmax)``, ties going to the smaller entry.

Finding the nearest entry means finding the rank of ``x`` among the 255 float32 midpoints of the
sorted code, ``rank = #{m : not (x <= m)}`` (``torch.bucketize``: ties to the smaller entry, NaN
ranks 255), then ``order[rank]``. A binary search takes 8 dependent gathers, the last ones
touching up to 8 cache lines per warp. Here the float's own bits do most of the search:

1. Group: sign and exponent of ``x`` (512 groups, stored exponent-major so that a warp's values
   of both signs share one cache line). The group's int32 entry gives its first cell and its
   resolution ``mb``: the group is cut into ``2**mb`` cells by the top ``mb`` mantissa bits. ``mb``
   is chosen per code and group, the smallest that leaves at most one midpoint in each cell:
   dense groups get fine cells, groups without midpoints a single one.
2. Cell record (int32): ``base``, the number of midpoints below the cell (low 8 bits), under the
   23 mantissa bits of the cell's midpoint (bits 8-30; all ones if the cell has none). Within
   a cell the top ``mb`` bits are equal, so ``x > midpoint`` is ``x``'s mantissa (shifted the
   same way) exceeding the record's: the sign bit of one subtraction, and
   ``rank = base + (x > midpoint)`` is ``record + that bit`` (low 8 bits).
3. ``order[rank]`` (uint8) is the code index; skipped (one branch per program) when the code is
   sorted, as the dynamic maps are.

Mantissas are those of ``key = bits ^ ((bits >> 31) & 0x7FFFFFFF)``, an integer that orders floats
as ``<`` does, so both signs are handled alike; midpoints equal to -0.0 are stored as +0.0, which
``x > m`` cannot tell apart. ``x`` is never infinite (``|x| <= 1`` after scaling, or NaN), so the
two exponent-255 groups give rank 255, NaN's rank.

Per element: two dependent gathers (group entry, cell record) and, for unsorted codes, the
``order`` one. With the dynamic map and normal data a warp touches about 1 + 9.7 (+ 2) cache lines
for them (the int16 records plus a rare midpoint load of the previous version: 1 + 6.1 + 2, a
tree walk about 14); the compiled kernel (sm_90, 16 elements per thread) runs about 25
instructions per element on its hot path, against 34 for the int16 records and 84 for the tree
walk. Tables, one int32 buffer per code (``TABLE_WORDS``: 19.9 KiB): group entries and 2 flags
(2 KiB), 29 words for callers and a flag (``FIT_WORD``: every record lies below
``SHARED_CELLS``), midpoints (1 KiB), final code indices by rank (768 B, room for 3 cases),
``CELLS`` cell records (16 KiB; the dynamic maps use 900 and 928). Where the flag is set, the
quantize kernel can stage the group entries and the first ``SHARED_CELLS`` records in shared
memory (6 KiB a program) and gather from there (``_SHARED_SEARCH``, opt-in until timed). They are built on the device (a
``torch.sort`` and two small kernels), without host synchronization, and cached per code tensor
(:func:`cached_search_tables`).

Crowded codes: if two midpoints of one group share their top 12 mantissa bits (or are equal, as
repeated code entries make them), or the cells would not fit in ``CELLS``, the group is marked
crowded, and a tile holding one of its elements also runs an 8-step binary search over the
midpoints for them (one branch per program: codes without crowded groups never pay for it).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ..._ops import num_blocks
from ..torch import quant_blockwise as reference
from . import cast_rtne, interpreting, warn_once

# Elements one program handles: enough to amortize the absmax reduction and keep 16-byte loads.
# Tuning knobs (module globals so that a benchmark can sweep them); warps None: 8 from 4096
# elements per program, else 4 (tests/gpu/tune_quant8.py, H100 2026-11-24: 4096-element tiles at
# 8 warps 67-71% of copy bandwidth for float32 at blocksize 256 and 4096, 62-63% at 4 warps).
_TILE = 4096
_QUANT_WARPS = None
# Register cap for the quantize kernel (None: the compiler's choice, about 75 at 16 elements per
# thread, 3 programs of 8 warps per SM; 64 allows 4 with no spill on the hot path).
_QUANT_MAXNREG = None
# Two options of the quantize kernel, off until timed on a GPU (tests/gpu/tune_quant8.py sweeps
# them). Session 9's profile had L1 91% busy; per warp of 32 elements the kernel touches about
# 1 + 1.5 + 10 cache lines for the input, the group entries and the cell records, and converts
# the scaled tile's layout through shared memory for the codes' store.
# _VEC: elements a thread holds in a run (None: the whole block row, today's layout); 4 (float32)
# or 8 (16-bit) keeps the codes in the input's layout, without the conversion: 33 against 39
# instructions an element on the hot path by an offline sm_90 compile (float32, blocksize 256).
# _SHARED_SEARCH: group entries and cell records staged in shared memory by each program (6 KiB)
# and gathered from there, for codes whose cells fit in SHARED_CELLS (the dynamic maps do).
_VEC = None
_SHARED_SEARCH = False
# Largest (padded) block kept whole in one program's registers; larger blocks use the reference.
_MAX_BLOCK = 16384
_CODE_SIZE = 256

# Layout of the search tables, in int32 words (jit functions read the constexpr copies: the
# only kind of global Triton 3.6 lets them read).
GROUPS_WORD = 0  # 512 group entries, then two flags: some group is crowded; order is identity
SORTED_WORD = GROUPS_WORD + 513  # the second flag: 1 when the code is sorted (rank = code index)
SPARE_WORD = 514  # 29 words a caller may use (0 as built): the optimizer's sign rule parameters
FIT_WORD = 543  # 1 when every cell record lies below SHARED_CELLS (the shared-memory search may run)
MIDPOINTS_WORD = 544  # 256 float32: the sorted midpoints, +inf at 255
ORDER_WORD = 800  # 768 bytes: code index by rank, up to 3 cases of 256 (quantize: 1, order)
RECORDS_WORD = 992  # CELLS int32 cell records
CELLS = 4096
TABLE_WORDS = RECORDS_WORD + CELLS
# Cell records a program can stage in shared memory for its gathers (4 KiB; the dynamic maps use
# 900 and 928).
SHARED_CELLS = 1024
_GROUPS = tl.constexpr(512)
_MIDPOINTS = tl.constexpr(MIDPOINTS_WORD)
_ORDER = tl.constexpr(ORDER_WORD)
_RECORDS = tl.constexpr(RECORDS_WORD)
_CELLS = tl.constexpr(CELLS)
_FIT = tl.constexpr(FIT_WORD)
_SHARED_CELLS = tl.constexpr(SHARED_CELLS)


# ---------------------------------------------------------------------------------------------
# the search


@triton.jit
def _records(tables_ptr):
    return tables_ptr + _RECORDS


@triton.jit
def _midpoints(tables_ptr):
    return (tables_ptr + _MIDPOINTS).to(tl.pointer_type(tl.float32))


@triton.jit
def final_codes(tables_ptr):
    """uint8 pointer to the code indices by rank (the launcher's final table; 256 per case)."""
    return (tables_ptr + _ORDER).to(tl.pointer_type(tl.uint8))


@triton.jit
def _group(bits):
    """Exponent * 2 + sign of float32 bits: a warp's values, of both signs, share few entries."""
    return ((bits >> 22) & 0x1FE) | ((bits >> 31) & 1)


@triton.jit
def _key(bits):
    """float32 bits -> int32 ordered like the floats (negatives: all but the sign bit flipped)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _binary_search_rank(x, midpoints_ptr):
    """#{m : not (x <= m)} over the 255 sorted midpoints (+inf pad at 255): 8 dependent gathers."""
    rank = tl.zeros(x.shape, tl.int32)
    for level in tl.static_range(8):
        step = 128 >> level
        midpoint = tl.load(midpoints_ptr + rank + (step - 1))
        rank = tl.where(x <= midpoint, rank, rank + step)
    return rank


@triton.jit
def _staged_gather(table_ptr, index, SIZE: tl.constexpr):
    """``table[index]`` for int32 ``index`` (any shape, values < SIZE) from the first SIZE words
    of a table, loaded as a register tensor that Triton stages in shared memory for the gather."""
    table = tl.load(table_ptr + tl.arange(0, SIZE))
    return tl.reshape(tl.gather(table, tl.reshape(index, [index.numel]), 0), index.shape)


@triton.jit
def nearest_rank(x, tables_ptr, SHARED_SEARCH: tl.constexpr = False):
    """Rank (int32, 0..255) of float32 ``x`` (|x| <= 1 or NaN) among the code's midpoints.

    ``#{m : not (x <= m)}``: the index into the sorted code of the nearest entry, ties to the
    smaller one, NaN last. ``tables_ptr``: the int32 buffer of :func:`search_tables`.
    ``SHARED_SEARCH``: gather the group entries and the first ``SHARED_CELLS`` cell records from
    shared memory, staged by the program, instead of from global memory (through L1: about 10
    cache lines a warp for the records of the dynamic map, and 64-bit addresses); valid only
    where the tables' ``FIT_WORD`` is set (see :func:`fitting_rank`).
    """
    bits = x.to(tl.int32, bitcast=True)
    if SHARED_SEARCH:
        entry = _staged_gather(tables_ptr, _group(bits), 512)
    else:
        entry = tl.load(tables_ptr + _group(bits))  # first cell << 16 | crowded << 15 | 31 - mb
    # The key's 23 mantissa bits, shifted up by 8 (bit 31 clear): the top mb pick the cell.
    mantissa8 = ((bits << 8) ^ (bits >> 31)) & 0x7FFFFF00
    cell = (entry >> 16) + (mantissa8 >> (entry & 31))
    if SHARED_SEARCH:
        record = _staged_gather(_records(tables_ptr), cell, _SHARED_CELLS)
    else:
        record = tl.load(_records(tables_ptr) + cell)
    # x > the cell's midpoint iff its mantissa exceeds the record's (the cell bits are equal):
    # then record - mantissa8 < 0 (no overflow: both are in [0, 2**31)).
    above = (record - mantissa8).to(tl.uint32, bitcast=True) >> 31
    rank = (record + above.to(tl.int32)) & 255
    if tl.load(tables_ptr + _GROUPS) != 0:  # uniform: some group of this code is crowded
        crowded = (entry >> 15) & 1
        if tl.max(crowded) > 0:
            rank = tl.where(crowded != 0, _binary_search_rank(x, _midpoints(tables_ptr)), rank)
    return rank


@triton.jit
def fitting_rank(x, tables_ptr, SHARED_SEARCH: tl.constexpr):
    """:func:`nearest_rank`, searching in shared memory when ``SHARED_SEARCH`` and the code's
    cells fit there (a uniform branch on the tables' flag), else in global memory."""
    if SHARED_SEARCH:
        if tl.load(tables_ptr + _FIT) != 0:
            rank = nearest_rank(x, tables_ptr, True)
        else:
            rank = nearest_rank(x, tables_ptr, False)
    else:
        rank = nearest_rank(x, tables_ptr, False)
    return rank


# ---------------------------------------------------------------------------------------------
# building the tables (once per code, on its device)


@triton.jit
def _midpoint_bits(lo, hi):
    """Bits of the float32 midpoint ``(lo + hi) / 2`` as the reference rounds it; -0.0 as +0.0."""
    bits = ((lo + hi) * 0.5).to(tl.int32, bitcast=True)  # * 0.5 rounds exactly as / 2
    return tl.where(bits == -2147483648, 0, bits)


@triton.jit
def _build_groups_kernel(sorted_ptr, order_ptr, tables_ptr, PAIRS: tl.constexpr):
    """One program: midpoints, ``order`` and the 512 group entries of a sorted 256-entry code."""
    i = tl.arange(0, 256)
    lo = tl.load(sorted_ptr + i)
    hi = tl.load(sorted_ptr + i + 1, mask=i < 255, other=0.0)
    tl.store(tables_ptr + _MIDPOINTS + i, tl.where(i < 255, _midpoint_bits(lo, hi), 0x7F800000))
    order = tl.load(order_ptr + i)
    tl.store(final_codes(tables_ptr) + i, order.to(tl.uint8))
    tl.store(tables_ptr + _GROUPS + 1, tl.min((order == i).to(tl.int32), axis=0))

    # Resolution each group needs: consecutive midpoints i, i + 1 of one group fall in different
    # cells once mb exceeds the number of leading mantissa bits they share.
    groups = tl.arange(0, 512)
    need = tl.zeros([512], tl.int32)
    for start in tl.static_range(0, 256, PAIRS):
        p = start + tl.arange(0, PAIRS)
        s0 = tl.load(sorted_ptr + p)
        s1 = tl.load(sorted_ptr + p + 1, mask=p + 1 < 256, other=0.0)
        s2 = tl.load(sorted_ptr + p + 2, mask=p + 2 < 256, other=0.0)
        first, second = _midpoint_bits(s0, s1), _midpoint_bits(s1, s2)
        group = _group(first)
        diff = (first ^ second) & 0x7FFFFF
        length = (diff.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 126  # bit length (diff >= 1)
        mb = tl.where(diff == 0, 24, 24 - length)  # 24: equal midpoints, no resolution separates them
        mb = tl.where((p < 254) & (group == _group(second)), mb, 0)
        need = tl.maximum(need, tl.max(tl.where(group[None, :] == groups[:, None], mb[None, :], 0), axis=1))
    need = tl.where(groups >= 510, 0, need)  # exponent 255 (NaN): one cell, rank 255

    # Largest resolution cap whose cells fit (so at most 12 bits: 2**13 cells do not); groups
    # needing more are crowded and get one cell.
    cap = tl.sum(need * 0)
    for c in tl.static_range(16):
        cells = tl.sum(tl.where(need <= c, tl.full([512], 1, tl.int32) << need, 1))
        cap = tl.where(cells <= _CELLS, c, cap)
    crowded = need > cap
    mb = tl.where(crowded, 0, need)
    size = tl.full([512], 1, tl.int32) << mb
    start_cell = tl.cumsum(size, axis=0) - size
    tl.store(tables_ptr + groups, (start_cell << 16) | (crowded.to(tl.int32) << 15) | (31 - mb))
    tl.store(tables_ptr + _GROUPS, tl.max(crowded.to(tl.int32), axis=0))
    tl.store(tables_ptr + _FIT, (tl.sum(size, axis=0) <= _SHARED_CELLS).to(tl.int32))


@triton.jit
def _build_cells_kernel(tables_ptr, BLOCK: tl.constexpr):
    """Cell records (int32) ``midpoint mantissa << 8 | base`` for BLOCK cells per program."""
    cell = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # The group owning the cell: how many groups end at or before it (binary search, 9 steps).
    group = tl.zeros([BLOCK], tl.int32)
    for level in tl.static_range(9):
        step = 256 >> level
        entry = tl.load(tables_ptr + group + (step - 1))
        end = (entry >> 16) + (1 << (31 - (entry & 31)))
        group = tl.where(end <= cell, group + step, group)
    entry = tl.load(tables_ptr + group)
    shift = (entry & 31) - 8  # 23 - mb: the key bits below the cell's
    # Key range of the cell: the group's smallest key plus the cell's offset in it.
    group_key = ((group & 1) << 31) | (((group >> 1) ^ ((group & 1) * 255)) << 23)
    key_lo = group_key + ((cell - (entry >> 16)) << shift)
    key_hi = key_lo + (1 << shift)
    # base = #{midpoints with key < key_lo} (binary search over the sorted midpoints' keys).
    base = tl.zeros([BLOCK], tl.int32)
    for level in tl.static_range(8):
        step = 128 >> level
        key = _key(tl.load(tables_ptr + _MIDPOINTS + base + (step - 1)))
        base = tl.where(key < key_lo, base + step, base)
    first = _key(tl.load(tables_ptr + _MIDPOINTS + base))
    second = _key(tl.load(tables_ptr + _MIDPOINTS + tl.minimum(base + 1, 255)))
    single = (first < key_hi) & (second >= key_hi)  # exactly one midpoint in the cell
    # No midpoint: the largest mantissa, which no key of the cell exceeds.
    record = (tl.where(single, first & 0x7FFFFF, 0x7FFFFF) << 8) | base
    record = tl.where(group >= 510, 0x7FFFFFFF, record)  # NaN: rank 255
    tl.store(_records(tables_ptr) + cell, record)


def search_tables(code: torch.Tensor) -> torch.Tensor:
    """256-entry code (any order) -> int32 [TABLE_WORDS] search tables on the code's device.

    Same stable sort and float32 midpoints as the reference's ``nearest_code``. Bytes from
    ``4 * ORDER_WORD`` hold ``order`` (sorted rank -> code index, uint8), which a caller with its
    own rounding rules may overwrite (768 bytes there are free). Built by device ops only (a sort
    and two small kernels), with no host synchronization.
    """
    sorted_code, order = torch.sort(code.float().reshape(-1), stable=True)
    tables = torch.zeros(TABLE_WORDS, dtype=torch.int32, device=code.device)  # unused words: 0
    # The interpreter pays per operation, not per element: one wide step instead of many.
    pairs, cells_per_program = (256, CELLS) if interpreting() else (16, 512)
    _build_groups_kernel[(1,)](sorted_code, order, tables, PAIRS=pairs, num_warps=8)
    _build_cells_kernel[(CELLS // cells_per_program,)](tables, BLOCK=cells_per_program, num_warps=4)
    return tables


_TABLE_CACHE: dict = {}


def cached_search_tables(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """:func:`search_tables` of ``code`` on ``device``, cached per code tensor.

    An entry is used while the same tensor object is alive and unmodified (its ``_version``); a
    new tensor with the same values is a new entry. :func:`clear_search_tables` empties the cache.
    """
    key = (id(code), torch.device(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    tables = search_tables(code.to(device))
    if len(_TABLE_CACHE) >= 64:
        _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = (weakref.ref(code), code._version, tables)
    return tables


def clear_search_tables() -> None:
    """Forget the cached search tables (they are rebuilt on the next call)."""
    _TABLE_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_absmax(x, INTERPRET: tl.constexpr):
    """max |x| of each row of a [rows, chunks, VEC] tile, NaN where the row holds one (as torch's
    amax; tl.max drops NaN)."""
    if INTERPRET:  # the interpreter calls a custom combine per element: add the NaNs instead
        nan = tl.sum(tl.sum(tl.where(x != x, x, 0.0), axis=2), axis=1)  # noqa: PLR0124
        return tl.max(tl.max(tl.abs(x), axis=2), axis=1) + nan
    else:
        return tl.reduce(tl.reduce(tl.abs(x), 2, _max_keep_nan), 1, _max_keep_nan)


@triton.jit
def _quantize_blockwise_kernel(
    a_ptr,
    tables_ptr,
    codes_ptr,
    absmax_ptr,
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    INTERPRET: tl.constexpr,
    VEC: tl.constexpr = None,
    SHARED_SEARCH: tl.constexpr = False,
):
    # A [BLOCKS_PER_PROGRAM, BLOCK_PAD // VEC, VEC] tile: one quantization block per row, so the
    # absmax is a row reduction in registers and the input is read once. A short innermost run
    # (VEC elements) makes Triton give the uint8 codes the input's layout, VEC to a thread; with
    # VEC = BLOCK_PAD it picks 16 codes a thread and converts the scaled values to that layout
    # through shared memory (16 KiB a 4096-element tile, written and read).
    V: tl.constexpr = BLOCK_PAD if VEC is None else VEC
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_PAD // V)[:, None] * V + tl.arange(0, V)[None, :]
    offsets = blocks[:, None, None] * BLOCKSIZE + cols[None, :, :]
    mask = (cols[None, :, :] < BLOCKSIZE) & (offsets < n)
    x = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    # A NaN makes its block's absmax NaN and all its codes 255, as in the reference.
    absmax = _row_absmax(x, INTERPRET)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    # Clamping to float32 tiny (2**-126) makes all-zero blocks give zeros instead of NaN.
    tiny = tl.full(absmax.shape, 1.1754943508222875e-38, tl.float32)
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), _max_keep_nan(absmax, tiny))
    scaled = x * inverse[:, None, None]

    rank = fitting_rank(scaled, tables_ptr, SHARED_SEARCH)
    if tl.load(tables_ptr + _GROUPS + 1) != 0:  # sorted code (the dynamic maps): index = rank
        code_index = rank.to(tl.uint8)
    else:
        code_index = tl.load(final_codes(tables_ptr) + rank)
    tl.store(codes_ptr + offsets, code_index, mask=mask)


@triton.jit
def _dequantize_blockwise_kernel(
    codes_ptr, code_ptr, absmax_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    index = tl.load(codes_ptr + offsets, mask=mask, other=0)
    value = tl.load(code_ptr + index.to(tl.int32))
    scale = tl.load(absmax_ptr + offsets // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, cast_rtne(value * scale, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (float16/bfloat16/float32, any shape) -> (uint8 codes shaped like A, float32 absmax [blocks]).

    ``code``: 256 entries, any order. Any positive ``blocksize``; blocks wider than 16384 elements
    fall back to the PyTorch reference (with one warning).
    """
    block_pad = triton.next_power_of_2(blocksize)
    if code.numel() != _CODE_SIZE or block_pad > _MAX_BLOCK:
        warn_once(
            f"quantize_blockwise:{code.numel()}:{blocksize > _MAX_BLOCK}",
            f"tritonbits: quantize_blockwise has no Triton kernel for a {code.numel()}-entry code with "
            f"blocksize {blocksize} (needs 256 entries, blocksize <= {_MAX_BLOCK}); using the PyTorch reference.",
        )
        return reference.quantize_blockwise(A, code, blocksize)
    n = A.numel()
    codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    if n == 0:
        return codes, absmax
    tables = cached_search_tables(code, A.device)
    blocks_per_program = min(max(1, _TILE // block_pad), triton.next_power_of_2(absmax.numel()))
    grid = (triton.cdiv(absmax.numel(), blocks_per_program),)
    tile = block_pad * blocks_per_program
    _quantize_blockwise_kernel[grid](
        A.contiguous(),
        tables,
        codes,
        absmax,
        n,
        absmax.numel(),
        BLOCKSIZE=blocksize,
        BLOCK_PAD=block_pad,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        INTERPRET=interpreting(),
        VEC=_VEC if _VEC is None else min(_VEC, block_pad),
        SHARED_SEARCH=_SHARED_SEARCH,
        num_warps=_QUANT_WARPS or (8 if tile >= 4096 else 4),
        **({"maxnreg": _QUANT_MAXNREG} if _QUANT_MAXNREG else {}),
    )
    return codes, absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 codes (any shape) -> ``code[A] * absmax[block]`` computed in float32, cast to ``dtype``."""
    if code.numel() < _CODE_SIZE:
        # A code index could point past the table; the reference raises a clear error for that.
        return reference.dequantize_blockwise(A, absmax, code, blocksize, dtype)
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    n = A.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, _TILE),)
    _dequantize_blockwise_kernel[grid](
        A.contiguous(),
        code.to(A.device, torch.float32).contiguous(),
        absmax.to(torch.float32).contiguous(),
        out,
        n,
        BLOCKSIZE=blocksize,
        BLOCK=_TILE,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return out
