"""Fused optimizer updates: one kernel reads the gradient, parameter and states and writes them back.

The update rules, their operation order and their special cases are those of
``backends/torch/optim.py`` (its module docstring has the table); results are bit-identical to
that reference. Every multiply, add, division (``div_rn``) and square root (``sqrt_rn``) is one
IEEE float32 operation in the reference's order, and kernels are compiled with
``enable_fp_fusion=False`` so that the GPU does not contract ``a * b + c`` into one FMA (which
would round once where the reference rounds twice). Python float hyperparameters enter as
float32, as they do in the reference's ``tensor * float``.

32-bit states: an elementwise kernel over tiles of ``_BLOCK_32BIT`` elements.

8-bit blockwise states: one program owns ``_BLOCKS_PER_PROGRAM`` whole state blocks of 256
elements, a ``[2, blocks, 32, 4]`` tile in registers laid out so that each block lives in one
warp (:func:`_block_tile`). It dequantizes the codes (``qmap[code] * absmax``), applies the rule
in float32, takes each block's new absmax (a reduction within the warp: the whole block must be
updated before any element can be requantized), finds the rank of each value among the qmap's
midpoints (the search of ``quant_blockwise.py``: two dependent table gathers), maps rank and sign
to the code through one uint8 table that holds the reference's sign rules, and writes the
parameter, the codes and the absmax. So a step reads ``g``, ``p``, the codes and absmax once and
writes ``p``, codes and absmax once. Addresses: int64 only for the program's first element and
block, int32 within the tile; tensors whose size is a multiple of the tile compile without masks
(``EVEN``).

Multi-tensor: :func:`multi_tensor_update_32bit` and :func:`multi_tensor_update_8bit_blockwise`
update a list of parameters sharing hyperparameters in one launch. The launcher writes one int64
table (tile offsets, element counts and each tensor's data pointers); each program finds its
tensor by binary search over the tile offsets and casts the stored addresses back to pointers.

Not fused (computed with the reference's PyTorch code, on the device, before or after the
kernel): the squared update norm that LAMB/LARS (``max_unorm > 0``) need over the whole tensor.
The trust ratio itself is applied inside the kernel, without a host synchronization.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._ops import num_blocks
from ..torch import optim as reference
from . import cast_rtne, interpreting
from .quant_blockwise import (
    ORDER_WORD,
    SORTED_WORD,
    SPARE_WORD,
    _max_keep_nan,
    final_codes,
    fitting_rank,
    search_tables,
)

# Rule ids (constexpr): lamb and lars are adam and momentum with a trust ratio.
ADAM, MOMENTUM, RMSPROP, ADAGRAD, LION, ADEMAMIX = 0, 1, 2, 3, 4, 5
_RULES = {
    "adam": ADAM,
    "lamb": ADAM,
    "momentum": MOMENTUM,
    "lars": MOMENTUM,
    "rmsprop": RMSPROP,
    "adagrad": ADAGRAD,
    "lion": LION,
    "ademamix": ADEMAMIX,
}
# The same ids as constexpr globals, the only kind a jit function may read.
_ADAM_ID, _MOMENTUM_ID, _RMSPROP_ID, _ADAGRAD_ID, _LION_ID, _ADEMAMIX_ID = (
    tl.constexpr(rule) for rule in (ADAM, MOMENTUM, RMSPROP, ADAGRAD, LION, ADEMAMIX)
)
_RULES_8BIT = ("adam", "momentum", "rmsprop", "adagrad", "lion", "ademamix")
_TWO_STATE = (ADAM, ADEMAMIX)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

STATE_BLOCK = 256  # elements per absmax block of every 8-bit optimizer state
# Tuning knobs (module globals so that a benchmark can sweep them).
_BLOCK_32BIT = 4096  # elements per program, 32-bit states (16 per thread at 8 warps)
_WARPS_32BIT = 8
# 256-element state blocks per program and warps, 8-bit states. A block lives in one warp when
# blocks >= warps (see _block_tile). Hot-path SASS instructions per element (sm_90, float32,
# whole blocks; 2026-11-25): AdamW 143 at 1 block / 2 warps, 121 at 2/2 or 4/4, 119 at 4/2 or
# 8/4 (about 150 registers); Lion 72 / 58 / 55; momentum 62 / 49 / 46. Fewer instructions did not
# make it faster: H200 step times (tests/gpu/tune_quant8.py, 16 x 4096x16384 float32, 2026-12-03)
# AdamW8bit 6.80 ms at 1/2, 7.41 at 2/2, 9.7-11.5 at 4-8 blocks; Lion8bit 4.30 / 4.78; SGD8bit
# (momentum) 3.85 / 4.32; all bit-identical to the reference.
_BLOCKS_PER_PROGRAM = 1
_WARPS_8BIT = 2
# The requantize search in shared memory (quant_blockwise's SHARED_SEARCH: 6 KiB of tables staged
# by each program and state, for qmaps whose cells fit, as the dynamic maps' do): L1 gathers of
# about 10 cache lines a warp traded for staging, which only programs of several blocks can
# amortize. Off until timed on a GPU (tests/gpu/tune_quant8.py sweeps it with the block counts).
_SHARED_SEARCH = False
# multi_tensor_*: tensors at least this large get their own launch (aligned pointers known to
# the compiler, so 16-byte accesses); smaller ones share one launch.
_MULTI_MAX_NUMEL = 1 << 20
_TABLE_ROWS = 8  # tile offsets, numel, g, p, state1, state2, absmax1, absmax2
_FLOAT32_TINY = 1.1754943508222875e-38
# Search-table words (quant_blockwise's spare ones) of the sign rules' arithmetic form: a flag,
# then the rank bounds it needs (see _search_tables).
_RULE_WORD = tl.constexpr(SPARE_WORD)


# ---------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _find_tensor(table_ptr, tile, n_tensors, LOG_TENSORS: tl.constexpr):
    """Index t of the tensor owning global ``tile``: the largest t with tile_start[t] <= tile."""
    t = tile * 0
    for level in tl.static_range(LOG_TENSORS):
        candidate = t + (1 << (LOG_TENSORS - 1 - level))
        start = tl.load(table_ptr + candidate, mask=candidate < n_tensors, other=tile + 1)
        t = tl.where(start <= tile, candidate, t)
    return t


@triton.jit
def _table_pointer(table_ptr, row: tl.constexpr, t, n_tensors, dtype: tl.constexpr):
    """Row ``row`` of the [8, n_tensors + 1] int64 table, entry t, as a pointer to ``dtype``."""
    return tl.load(table_ptr + row * (n_tensors + 1) + t).to(tl.pointer_type(dtype))


@triton.jit
def _trust_ratio(unorm_ptr, limit, HAS_UNORM: tl.constexpr):
    """The reference's ``s``: limit / ||update|| when that norm exceeds limit, else 1 (float32)."""
    if HAS_UNORM:
        unorm = tl.sqrt_rn(tl.load(unorm_ptr).to(tl.float32))
        # torch evaluates ``float / tensor`` as ``tensor.reciprocal() * float``.
        return tl.where(unorm > limit, tl.math.div_rn(1.0, unorm) * limit, 1.0)
    else:
        return 1.0


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _block_tile(BLOCKS: tl.constexpr, n_left):
    """A program's BLOCKS state blocks as a [2, BLOCKS, 32, 4] tile: element (h, b, t, k) is
    element 128 h + 4 t + k of block b. Thread t of a warp holds 4 consecutive elements (16-byte
    float32 accesses; the innermost 4 keep the uint8 codes at 4 per thread too, in the same
    layout) and the warps go along the blocks axis, so with at least as many blocks as warps each
    block lives in one warp and its absmax is a register and shuffle reduction (no shared memory,
    no barrier). A [blocks, 256] tile gets its warps split across each block.

    Returns int32 (blocks [1, BLOCKS, 1, 1], element offsets, both relative to the program's
    first block, and the mask ``offsets < n_left``, which EVEN code, every block whole and
    present, does not use).
    """
    blocks = tl.arange(0, BLOCKS)[None, :, None, None]
    row = tl.arange(0, 2)[:, None, None, None] * 128 + tl.arange(0, 32)[None, None, :, None] * 4
    offsets = blocks * 256 + row + tl.arange(0, 4)[None, None, None, :]
    return blocks, offsets, offsets < n_left


@triton.jit
def _block_max(x, INTERPRET: tl.constexpr):
    """Per-block max of a [2, BLOCKS, 32, 4] tile, as [1, BLOCKS, 1, 1], NaN where the block holds
    a NaN (as the reference's torch amax; tl.max drops NaN, on the GPU and in the interpreter)."""
    if INTERPRET:  # the interpreter calls a custom combine per element: add the NaNs instead
        is_nan = x != x  # noqa: PLR0124
        nan = tl.where(is_nan, x, 0.0)
        x = tl.where(is_nan, 0.0, x)  # (x >= 0; an all-NaN block makes numpy's nanmax warn)
        x = tl.max(tl.max(x, axis=3, keep_dims=True), axis=0, keep_dims=True)
        nan = tl.sum(tl.sum(nan, axis=3, keep_dims=True), axis=0, keep_dims=True)
        return tl.max(x, axis=2, keep_dims=True) + tl.sum(nan, axis=2, keep_dims=True)
    else:
        x = tl.reduce(tl.reduce(x, 3, _max_keep_nan, keep_dims=True), 0, _max_keep_nan, keep_dims=True)
        return tl.reduce(x, 2, _max_keep_nan, keep_dims=True)


@triton.jit
def _dequantize(codes_ptr, absmax_ptr, qmap, offsets, mask, blocks, n_blocks, EVEN: tl.constexpr):
    """float32 ``qmap[code] * absmax[block]`` for a [2, BLOCKS, 32, 4] tile; ``qmap`` the 256 code
    values in registers: the lookup is a gather that Triton serves from shared memory (a gather
    from global memory costs an L1 access per element)."""
    if EVEN:
        code = tl.load(codes_ptr + offsets)
        absmax = tl.load(absmax_ptr + blocks)
    else:
        code = tl.load(codes_ptr + offsets, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0.0)
    code = code.to(tl.int32)
    values = tl.reshape(tl.gather(qmap, tl.reshape(code, [code.numel]), 0), code.shape)
    return values * absmax


@triton.jit
def _requantize(values, codes_ptr, absmax_ptr, tables_ptr, offsets, mask, blocks, n_blocks,
                SIGNED: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr,
                SHARED_SEARCH: tl.constexpr = False):  # fmt: skip
    """Write a [2, BLOCKS, 32, 4] float32 tile (:func:`_block_tile`) as codes (nearest qmap entry)
    and per-block absmax.

    ``tables``: the qmap's search tables (:func:`_search_tables`), whose final table holds, for
    each case of the value (+0.0 or NaN; sign bit set; > 0) and rank, the code after the
    reference's sign rules.
    """
    if not EVEN:
        values = tl.where(mask, values, 0.0)
    # A NaN makes its block's absmax NaN and all its codes 255 (254 where the sign bit is set),
    # as in the reference.
    absmax = _block_max(tl.abs(values), INTERPRET)
    # Stored by lane 0 of a [1, BLOCKS, 32, 1] tile whose addresses run along the lanes: the
    # store then gets the tile's layout (block b in its warp). A [1, BLOCKS, 1, 1] store gets a
    # layout of its own, and converting to it costs a trip through shared memory and 2 barriers.
    lanes = tl.arange(0, 32)[None, None, :, None]
    first = lanes == 0
    if not EVEN:
        first = first & (blocks < n_blocks)
    tl.store(absmax_ptr + (blocks + lanes), tl.broadcast_to(absmax, [1, absmax.shape[1], 32, 1]), mask=first)
    # Clamping to float32 tiny makes all-zero blocks give zeros instead of NaN (and keeps a NaN).
    tiny = tl.full(absmax.shape, 1.1754943508222875e-38, tl.float32)
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), _max_keep_nan(absmax, tiny))
    scaled = values * inverse
    rank = fitting_rank(scaled, tables_ptr, SHARED_SEARCH)
    # The case of the value (not of scaled, which can underflow to 0), as the table's row: 0 +0.0
    # or NaN, 1 sign bit set, 2 > 0. Only > 0 matters to the unsigned rule.
    bits = values.to(tl.int32, bitcast=True)
    if tl.load(tables_ptr + _RULE_WORD) != 0:
        # Sorted qmap (code = rank) whose rules reduce to comparisons of the rank with bounds:
        # no table gather, which touches up to 6 cache lines a warp (uniform branch per program).
        lo = tl.load(tables_ptr + _RULE_WORD + 1)
        if SIGNED:  # lo: ranks below it hold the entries with the sign bit set
            below = (rank < lo).to(tl.int32)
            code = tl.where(values > 0, rank + below, tl.where(bits < 0, rank - (1 - below), rank - below))
        else:  # entries equal to 0 at ranks lo .. hi - 1
            hi = tl.load(tables_ptr + _RULE_WORD + 2)
            code = tl.where((values > 0) & (rank >= lo) & (rank < hi), rank + 1, rank)
        code = code.to(tl.uint8)  # wraps modulo 256, as the table does
    else:
        if SIGNED:
            row = ((bits >> 23) & 256) | tl.where(values > 0, 512, 0)
        else:
            row = tl.where(values > 0, 512, 0)
        code = tl.load(final_codes(tables_ptr) + (row | rank))
    if EVEN:
        tl.store(codes_ptr + offsets, code)
    else:
        tl.store(codes_ptr + offsets, code, mask=mask)


# ---------------------------------------------------------------------------------------------
# 32-bit states


@triton.jit
def _update_32bit_kernel(
    g_ptr, p_ptr, state1_ptr, state2_ptr, unorm_ptr, table_ptr, n_tensors, n,
    beta1, beta2, beta3, one_minus_beta1, one_minus_beta2, one_minus_beta3, alpha, eps, eps_c2, c1, c2,
    lr, neg_lr, step_size, weight_decay, decay, has_weight_decay, first_step, gnorm_scale, limit,
    RULE: tl.constexpr, HAS_UNORM: tl.constexpr, SKIP_ZEROS: tl.constexpr, MULTI: tl.constexpr,
    LOG_TENSORS: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0).to(tl.int64)
    if MULTI:
        t = _find_tensor(table_ptr, tile, n_tensors, LOG_TENSORS)
        tile = tile - tl.load(table_ptr + t)
        n = tl.load(table_ptr + (n_tensors + 1) + t)
        g_ptr = _table_pointer(table_ptr, 2, t, n_tensors, P_DTYPE)
        p_ptr = _table_pointer(table_ptr, 3, t, n_tensors, P_DTYPE)
        state1_ptr = _table_pointer(table_ptr, 4, t, n_tensors, tl.float32)
        state2_ptr = _table_pointer(table_ptr, 5, t, n_tensors, tl.float32)
    offsets = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * gnorm_scale
    param = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(state1_ptr + offsets, mask=mask, other=0.0)
    scale = _trust_ratio(unorm_ptr, limit, HAS_UNORM)

    if RULE == _ADAM_ID:
        s2 = tl.load(state2_ptr + offsets, mask=mask, other=0.0)
        m = s1 * beta1 + one_minus_beta1 * grad
        v = s2 * beta2 + one_minus_beta2 * (grad * grad)
        new_p = param + (scale * step_size) * tl.math.div_rn(m, tl.sqrt_rn(v) + eps_c2)
        new_p = tl.where(has_weight_decay, new_p * decay, new_p)
        if SKIP_ZEROS:
            keep = grad == 0.0
            new_p = tl.where(keep, param, new_p)
            m = tl.where(keep, s1, m)
            v = tl.where(keep, s2, v)
        tl.store(state1_ptr + offsets, m, mask=mask)
        tl.store(state2_ptr + offsets, v, mask=mask)
    elif RULE == _ADEMAMIX_ID:
        s1b = tl.load(state1_ptr + n + offsets, mask=mask, other=0.0)
        s2 = tl.load(state2_ptr + offsets, mask=mask, other=0.0)
        m1 = s1 * beta1 + one_minus_beta1 * grad
        m2 = s1b * beta3 + one_minus_beta3 * grad
        v = s2 * beta2 + one_minus_beta2 * (grad * grad)
        numerator = tl.math.div_rn(m1, c1) + alpha * m2
        new_p = param - lr * tl.math.div_rn(numerator, tl.math.div_rn(tl.sqrt_rn(v), c2) + eps)
        new_p = tl.where(has_weight_decay, new_p * decay, new_p)
        tl.store(state1_ptr + offsets, m1, mask=mask)
        tl.store(state1_ptr + n + offsets, m2, mask=mask)
        tl.store(state2_ptr + offsets, v, mask=mask)
    else:
        if RULE != _LION_ID:  # coupled weight decay
            grad = tl.where(has_weight_decay, grad + param * weight_decay, grad)
        if RULE == _MOMENTUM_ID:
            s1_new = tl.where(first_step, grad, s1 * beta1 + grad)
            new_p = param + scale * (neg_lr * s1_new)
        elif RULE == _RMSPROP_ID:
            s1_new = s1 * beta1 + one_minus_beta1 * (grad * grad)
            new_p = param - scale * (lr * tl.math.div_rn(grad, tl.sqrt_rn(s1_new) + eps))
        elif RULE == _ADAGRAD_ID:
            s1_new = s1 + grad * grad
            new_p = param - lr * tl.math.div_rn(grad, tl.sqrt_rn(s1_new) + eps)
        else:  # _LION_ID
            decayed = tl.where(has_weight_decay, param * decay, param)
            new_p = decayed - scale * (lr * _sign(s1 * beta1 + one_minus_beta1 * grad))
            s1_new = s1 * beta2 + one_minus_beta2 * grad
        if SKIP_ZEROS:
            keep = grad == 0.0
            new_p = tl.where(keep, param, new_p)
            s1_new = tl.where(keep, s1, s1_new)
        tl.store(state1_ptr + offsets, s1_new, mask=mask)
    tl.store(p_ptr + offsets, cast_rtne(new_p, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise states


@triton.jit
def _update_8bit_kernel(
    g_ptr, p_ptr, codes1_ptr, codes2_ptr, absmax1_ptr, absmax2_ptr,
    qmap1_ptr, tables1_ptr, qmap2_ptr, tables2_ptr, table_ptr, n_tensors, n,
    beta1, beta2, beta3, one_minus_beta1, one_minus_beta2, one_minus_beta3, alpha, eps, eps_c2, c1, c2,
    lr, step_size, weight_decay, decay, has_weight_decay, first_step, gnorm_scale,
    RULE: tl.constexpr, SKIP_ZEROS: tl.constexpr, MULTI: tl.constexpr, LOG_TENSORS: tl.constexpr,
    P_DTYPE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, EVEN: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr, SHARED_SEARCH: tl.constexpr = False,
):  # fmt: skip
    tile = tl.program_id(0).to(tl.int64)
    if MULTI:
        t = _find_tensor(table_ptr, tile, n_tensors, LOG_TENSORS)
        tile = tile - tl.load(table_ptr + t)
        n = tl.load(table_ptr + (n_tensors + 1) + t)
        g_ptr = _table_pointer(table_ptr, 2, t, n_tensors, P_DTYPE)
        p_ptr = _table_pointer(table_ptr, 3, t, n_tensors, P_DTYPE)
        codes1_ptr = _table_pointer(table_ptr, 4, t, n_tensors, tl.uint8)
        codes2_ptr = _table_pointer(table_ptr, 5, t, n_tensors, tl.uint8)
        absmax1_ptr = _table_pointer(table_ptr, 6, t, n_tensors, tl.float32)
        absmax2_ptr = _table_pointer(table_ptr, 7, t, n_tensors, tl.float32)
        if ALIGNED:  # 16-byte accesses (and no layout conversions between the loads)
            g_ptr = tl.multiple_of(g_ptr, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
            codes1_ptr = tl.multiple_of(codes1_ptr, 16)
            codes2_ptr = tl.multiple_of(codes2_ptr, 16)
    n_blocks = (n + 255) // 256
    # 64-bit arithmetic for the program's first element and block only; int32 within the tile.
    base = tile * (BLOCKS_PER_PROGRAM * 256)
    first_block = tile * BLOCKS_PER_PROGRAM
    # Elements and blocks of this tensor from the program's first on, at most one tile's worth.
    n_left = tl.minimum(n - base, BLOCKS_PER_PROGRAM * 256).to(tl.int32)
    blocks_left = tl.minimum(n_blocks - first_block, BLOCKS_PER_PROGRAM).to(tl.int32)
    blocks, offsets, mask = _block_tile(BLOCKS_PER_PROGRAM, n_left)
    g_ptr += base
    p_ptr += base
    codes1_ptr += base
    codes2_ptr += base
    absmax1_ptr += first_block
    absmax2_ptr += first_block
    if EVEN:
        raw = tl.load(g_ptr + offsets).to(tl.float32)
        param = tl.load(p_ptr + offsets).to(tl.float32)
    else:
        raw = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        param = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # gnorm_scale == 1: ``raw * 1.0`` equals raw except for NaN payloads, which SCALE_GRAD keeps
    # where a gradient can reach a state unchanged (momentum's first step).
    grad = raw * gnorm_scale if SCALE_GRAD else raw

    qmap1 = tl.load(qmap1_ptr + tl.arange(0, 256))  # the state code values, gathered from registers
    if RULE == _ADAM_ID or RULE == _ADEMAMIX_ID:
        # Non-finite gradients reset the states to 0 and leave p as it was.
        finite = tl.abs(grad) <= 3.4028234663852886e38  # float32 max: False for inf and NaN
        qmap2 = tl.load(qmap2_ptr + tl.arange(0, 256))
        v = _dequantize(codes2_ptr, absmax2_ptr, qmap2, offsets, mask, blocks, blocks_left, EVEN)
        v = tl.where(finite, v * beta2 + one_minus_beta2 * grad * grad, 0.0)
        m = _dequantize(codes1_ptr, absmax1_ptr, qmap1, offsets, mask, blocks, blocks_left, EVEN)
        m = tl.where(finite, m * beta1 + one_minus_beta1 * grad, 0.0)
        if RULE == _ADAM_ID:
            new_p = param + step_size * tl.math.div_rn(m, tl.sqrt_rn(v) + eps_c2)
        else:
            codes3_ptr = codes1_ptr + n  # the second momentum: state1[1], absmax1[1]
            absmax3_ptr = absmax1_ptr + n_blocks
            m2 = _dequantize(codes3_ptr, absmax3_ptr, qmap1, offsets, mask, blocks, blocks_left, EVEN)
            m2 = tl.where(finite, m2 * beta3 + one_minus_beta3 * grad, 0.0)
            numerator = tl.math.div_rn(m, c1) + alpha * m2
            new_p = param - lr * tl.math.div_rn(numerator, tl.math.div_rn(tl.sqrt_rn(v), c2) + eps)
            _requantize(m2, codes3_ptr, absmax3_ptr, tables1_ptr, offsets, mask, blocks, blocks_left,
                        SIGNED=True, EVEN=EVEN, INTERPRET=INTERPRET, SHARED_SEARCH=SHARED_SEARCH)  # fmt: skip
        new_p = tl.where(has_weight_decay, new_p * decay, new_p)
        new_p = tl.where(finite, new_p, param)
        _requantize(m, codes1_ptr, absmax1_ptr, tables1_ptr, offsets, mask, blocks, blocks_left, SIGNED=True,
                    EVEN=EVEN, INTERPRET=INTERPRET, SHARED_SEARCH=SHARED_SEARCH)  # fmt: skip
        _requantize(v, codes2_ptr, absmax2_ptr, tables2_ptr, offsets, mask, blocks, blocks_left, SIGNED=False,
                    EVEN=EVEN, INTERPRET=INTERPRET, SHARED_SEARCH=SHARED_SEARCH)  # fmt: skip
    else:
        s1 = _dequantize(codes1_ptr, absmax1_ptr, qmap1, offsets, mask, blocks, blocks_left, EVEN)
        if RULE != _LION_ID:  # coupled weight decay
            grad = tl.where(has_weight_decay, grad + param * weight_decay, grad)
        if RULE == _MOMENTUM_ID:
            s1_new = tl.where(first_step, grad, s1 * beta1 + grad)
            new_p = param - lr * s1_new
        elif RULE == _RMSPROP_ID:
            s1_new = s1 * beta1 + one_minus_beta1 * (grad * grad)
            new_p = param - lr * tl.math.div_rn(grad, tl.sqrt_rn(s1_new) + eps)
        elif RULE == _ADAGRAD_ID:
            s1_new = s1 + grad * grad
            new_p = param - lr * tl.math.div_rn(grad, tl.sqrt_rn(s1_new) + eps)
        else:  # _LION_ID
            decayed = tl.where(has_weight_decay, param * decay, param)
            new_p = decayed - lr * _sign(s1 * beta1 + one_minus_beta1 * grad)
            s1_new = s1 * beta2 + one_minus_beta2 * grad
        if SKIP_ZEROS:  # the 8-bit rules test the raw gradient (before weight decay)
            keep = raw == 0.0
            new_p = tl.where(keep, param, new_p)
            s1_new = tl.where(keep, s1, s1_new)
        _requantize(s1_new, codes1_ptr, absmax1_ptr, tables1_ptr, offsets, mask, blocks, blocks_left, SIGNED=True,
                    EVEN=EVEN, INTERPRET=INTERPRET, SHARED_SEARCH=SHARED_SEARCH)  # fmt: skip
    new_p = cast_rtne(new_p, p_ptr.dtype.element_ty, INTERPRET)
    if EVEN:
        tl.store(p_ptr + offsets, new_p)
    else:
        tl.store(p_ptr + offsets, new_p, mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers


def _rule(optimizer_name: str, allowed) -> int:
    if optimizer_name not in allowed:
        raise ValueError(f"optimizer_name must be one of {tuple(allowed)}, got {optimizer_name!r}")
    return _RULES[optimizer_name]


def _scalars(beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale) -> dict:
    """Kernel float/int arguments, computed in Python doubles as the reference does."""
    c1 = 1.0 - beta1**step
    c2 = math.sqrt(1.0 - beta2**step)
    return dict(
        beta1=beta1, beta2=beta2, beta3=beta3, one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
        one_minus_beta3=1.0 - beta3, alpha=alpha, eps=eps, eps_c2=eps * c2, c1=c1, c2=c2, lr=lr,
        step_size=-lr * c2 / c1, weight_decay=weight_decay, decay=1.0 - lr * weight_decay,
        has_weight_decay=weight_decay > 0.0, first_step=step == 1, gnorm_scale=gnorm_scale,
    )  # fmt: skip


def _scale_grad(rule: int, gnorm_scale: float) -> bool:
    """Whether the 8-bit kernel multiplies the gradient by gnorm_scale. ``g * 1.0`` equals ``g``
    but for NaN payloads (the GPU returns its canonical NaN), which only momentum can store
    unchanged (its first step keeps the gradient); every other rule computes with it first."""
    return gnorm_scale != 1.0 or rule == MOMENTUM


class _Contiguous:
    """A contiguous tensor to run a kernel on, copied back into ``dst`` by ``write_back()``."""

    def __init__(self, dst: Optional[Tensor]):
        self.dst = dst
        self.work = None if dst is None else (dst if dst.is_contiguous() else dst.contiguous())

    def write_back(self) -> None:
        if self.work is not None and self.work is not self.dst:
            self.dst.copy_(self.work)


_TABLE_CACHE: dict = {}


def _search_tables(qmap: Tensor, device: torch.device, signed: bool) -> tuple[Tensor, Tensor]:
    """(float32 qmap [256], int32 search tables) of a 256-entry qmap, for the signed or unsigned rule.

    The tables are ``quant_blockwise.search_tables``' with the final table replaced by the
    reference's rounding rules, for each case of the value (rows: +0.0 or NaN; sign bit set; > 0)
    and each rank:

    - signed: a value must not round to an entry of the other sign (a tiny negative value to the
      entry 0.0): step one entry towards the value's sign (down unless the value is > 0). Signs
      are sign bits, as ``torch.signbit``.
    - unsigned: a positive second moment must not round to 0 (Adam would step by ~lr * m / eps):
      round it up one entry.

    Cached per qmap tensor (the optimizer passes the same one every step) until it is modified
    in place or freed; building them needs no host synchronization.
    """
    key = (id(qmap), device, signed)
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0]() is qmap and hit[1] == qmap._version:
        return hit[2]
    values = qmap.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    search = search_tables(values)
    sorted_values, order = torch.sort(values, stable=True)  # the ranks' order in search
    negative = torch.signbit(sorted_values).long()
    if signed:
        final = torch.stack([order - negative, order - (1 - negative), order + negative])
    else:
        final = torch.stack([order, order, order + (sorted_values == 0).long()])
    # int64 -> uint8 wraps modulo 256, as the reference's index.to(torch.uint8) does.
    search.view(torch.uint8)[4 * ORDER_WORD : 4 * ORDER_WORD + 768] = final.reshape(-1).to(torch.uint8)
    # The same rules as rank comparisons, for a sorted qmap (order is the identity): signed, when
    # the entries with the sign bit set are the first ``lo`` (a -0.0 after a +0.0 breaks that);
    # unsigned always (entries equal to 0 are consecutive). Set on the device: no synchronization.
    ranks = torch.arange(values.numel(), device=device)
    identity = search[SORTED_WORD] != 0  # the flag search_tables set: the qmap is sorted
    if signed:
        lo = negative.sum()
        usable = identity & (negative == (ranks < lo).long()).all()
        rule = torch.stack([usable.long(), lo, lo])
    else:
        zero = (sorted_values == 0).long()
        lo = torch.where(zero.any(), torch.argmax(zero), 0)
        rule = torch.stack([identity.long(), lo, lo + zero.sum()])
    search[SPARE_WORD : SPARE_WORD + 3] = rule.to(torch.int32)
    tables = (values, search)
    if len(_TABLE_CACHE) > 64:
        _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = (weakref.ref(qmap), qmap._version, tables)
    return tables


def _launch_options(device: torch.device) -> dict:
    # No FMA contraction: the reference rounds every product and sum (see the module docstring).
    return {} if interpreting() and device.type == "cpu" else {"enable_fp_fusion": False}


def optimizer_update_32bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    unorm_vec: Optional[Tensor],
    max_unorm: float,
    param_norm: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    step: int,
    lr: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> None:
    """One fused in-place step with float32 states (the ``tritonbits::optimizer_update_32bit`` op).

    Args:
        g, p: gradient and parameter, same shape and dtype (float32, float16 or bfloat16).
        state1, state2: float32 shaped like p (ademamix: state1 is [2, *p.shape]; state2 only for
            adam, lamb and ademamix).
        unorm_vec: float32 [1], required when ``max_unorm > 0`` (LAMB, LARS): overwritten with the
            squared update norm (by PyTorch ops), whose trust ratio the kernel applies.
        param_norm: ||p||_2, used only when ``max_unorm > 0``.
        step: 1-based step count.
    """
    rule = _rule(optimizer_name, _RULES)
    n = p.numel()
    if n == 0:
        return
    has_unorm = max_unorm > 0.0
    if has_unorm and optimizer_name != "lion":
        grad = g.reshape(-1).float() * gnorm_scale
        unorm_vec.fill_(reference._update_norm_squared(optimizer_name, grad, state1, state2, beta1, beta2, eps, step))
    limit = max_unorm * param_norm + (0.0 if rule in _TWO_STATE else eps)

    g_work, p_work, s1_work, s2_work = (_Contiguous(t) for t in (g, p, state1, state2))
    grid = (triton.cdiv(n, _BLOCK_32BIT),)
    _update_32bit_kernel[grid](
        g_work.work, p_work.work, s1_work.work, s1_work.work if state2 is None else s2_work.work,
        unorm_vec if has_unorm else s1_work.work, s1_work.work, 1, n,
        limit=limit, neg_lr=-lr, RULE=rule, HAS_UNORM=has_unorm, SKIP_ZEROS=bool(skip_zeros), MULTI=False,
        LOG_TENSORS=0, P_DTYPE=_TL_DTYPES[p.dtype], BLOCK=_BLOCK_32BIT, INTERPRET=interpreting(),
        num_warps=_WARPS_32BIT, **_scalars(beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale),
        **_launch_options(p.device),
    )  # fmt: skip
    for work in (p_work, s1_work, s2_work):
        work.write_back()
    if has_unorm and optimizer_name == "lion":
        # Lion's norm is taken after the step, for the next step to read.
        grad = g.reshape(-1).float() * gnorm_scale
        unorm_vec.fill_(reference._update_norm_squared("lion", grad, state1, None, beta1, beta2, eps, step))


def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    weight_decay: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> None:
    """One fused in-place step with 8-bit blockwise states (``tritonbits::optimizer_update_8bit_blockwise``).

    Args:
        g, p: gradient and parameter, same shape and dtype (float32, float16 or bfloat16).
        state1: uint8 codes shaped like p (ademamix: [2, *p.shape]) into ``qmap1`` (256 sorted
            float32 entries, the signed dynamic map), with float32 ``absmax1`` [ceil(n / 256)]
            (ademamix: [2, ceil(n / 256)]).
        state2, qmap2, absmax2: the second moment (adam, ademamix): uint8 codes into the sorted
            unsigned map ``qmap2``, float32 absmax [ceil(n / 256)]; None for 1-state rules.
        step: 1-based step count.
    """
    rule = _rule(optimizer_name, _RULES_8BIT)
    n = p.numel()
    if n == 0:
        return
    device = p.device
    qmap1_, tables1 = _search_tables(qmap1, device, signed=True)
    qmap2_, tables2 = _search_tables(qmap2, device, signed=False) if rule in _TWO_STATE else (qmap1_, tables1)
    works = [_Contiguous(t) for t in (g, p, state1, state2, absmax1, absmax2)]
    g_, p_, c1_, c2_, a1_, a2_ = (w.work for w in works)
    grid = (triton.cdiv(num_blocks(n, STATE_BLOCK), _BLOCKS_PER_PROGRAM),)
    _update_8bit_kernel[grid](
        g_, p_, c1_, c1_ if c2_ is None else c2_, a1_, a1_ if a2_ is None else a2_,
        qmap1_, tables1, qmap2_, tables2, a1_, 1, n,
        RULE=rule, SKIP_ZEROS=bool(skip_zeros), MULTI=False, LOG_TENSORS=0, P_DTYPE=_TL_DTYPES[p.dtype],
        BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM, EVEN=n % (_BLOCKS_PER_PROGRAM * STATE_BLOCK) == 0,
        SCALE_GRAD=_scale_grad(rule, gnorm_scale), ALIGNED=False, INTERPRET=interpreting(), num_warps=_WARPS_8BIT,
        SHARED_SEARCH=_SHARED_SEARCH,
        **_scalars(beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale), **_launch_options(device),
    )  # fmt: skip
    for work in works[1:]:
        work.write_back()


# ---------------------------------------------------------------------------------------------
# multi-tensor launchers


def _pointer_table(tiles: list[int], numels: list[int], columns: list[list[Optional[Tensor]]], device) -> Tensor:
    """The int64 [8, T + 1] table the MULTI kernels read (rows: tile starts, numel, 6 pointers)."""
    T = len(tiles)
    starts = [0]
    for count in tiles:
        starts.append(starts[-1] + count)
    rows = [starts, numels + [0]]
    for column in columns:
        rows.append([0 if t is None else t.data_ptr() for t in column] + [0])
    rows += [[0] * (T + 1)] * (_TABLE_ROWS - len(rows))
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return table
    # Pinned and asynchronous: the copy does not wait for the kernels queued before it.
    return table.pin_memory().to(device, non_blocking=True)


def _check_multi(gs, ps, state_lists) -> None:
    count = len(ps)
    for name, values in (("gs", gs), *state_lists):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries, ps has {count}")
    dtypes = {p.dtype for p in ps}
    devices = {p.device for p in ps}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"ps must share one dtype and device, got dtypes {dtypes} and devices {devices}")


def multi_tensor_update_32bit(
    optimizer_name: str,
    gs: list[Tensor],
    ps: list[Tensor],
    state1s: list[Tensor],
    state2s: Optional[list[Optional[Tensor]]],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    step: int,
    lr: float,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
) -> None:
    """:func:`optimizer_update_32bit` (without a trust ratio) for many parameters at once.

    Every ``ps[i]`` shares one dtype, device and the hyperparameters; ``gs``/``state1s``/
    ``state2s`` are per parameter as in the single-tensor op (``state2s`` None for 1-state
    rules). Parameters of at least ``_MULTI_MAX_NUMEL`` elements get their own launch; the others
    share one. Tensors must be contiguous.
    """
    rule = _rule(optimizer_name, _RULES)
    state2s = state2s if rule in _TWO_STATE else [None] * len(ps)
    _check_multi(gs, ps, [("state1s", state1s), ("state2s", state2s)])
    small = []
    for g, p, s1, s2 in zip(gs, ps, state1s, state2s):
        if p.numel() >= _MULTI_MAX_NUMEL:
            optimizer_update_32bit(optimizer_name, g, p, s1, s2, None, 0.0, 0.0, beta1, beta2, beta3, alpha, eps,
                                   weight_decay, step, lr, gnorm_scale, skip_zeros)  # fmt: skip
        elif p.numel() > 0:
            small.append((g, p, s1, s2))
    if not small:
        return
    device = small[0][1].device
    tiles = [triton.cdiv(p.numel(), _BLOCK_32BIT) for _, p, _, _ in small]
    table = _pointer_table(tiles, [p.numel() for _, p, _, _ in small], [list(c) for c in zip(*small)], device)
    first = small[0]
    _update_32bit_kernel[(sum(tiles),)](
        first[0], first[1], first[2], first[2], first[2], table, len(small), 0,
        limit=0.0, neg_lr=-lr, RULE=rule, HAS_UNORM=False, SKIP_ZEROS=bool(skip_zeros), MULTI=True,
        LOG_TENSORS=(len(small) - 1).bit_length(), P_DTYPE=_TL_DTYPES[first[1].dtype], BLOCK=_BLOCK_32BIT,
        INTERPRET=interpreting(), num_warps=_WARPS_32BIT,
        **_scalars(beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale), **_launch_options(device),
    )  # fmt: skip


def multi_tensor_update_8bit_blockwise(
    optimizer_name: str,
    gs: list[Tensor],
    ps: list[Tensor],
    state1s: list[Tensor],
    state2s: Optional[list[Optional[Tensor]]],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1s: list[Tensor],
    absmax2s: Optional[list[Optional[Tensor]]],
    weight_decay: float,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
) -> None:
    """:func:`optimizer_update_8bit_blockwise` for many parameters at once.

    Every ``ps[i]`` shares one dtype, device, the maps ``qmap1``/``qmap2`` and the
    hyperparameters; the other lists are per parameter as in the single-tensor op (``state2s``
    and ``absmax2s`` None for 1-state rules). Parameters of at least ``_MULTI_MAX_NUMEL``
    elements get their own launch; the others share one. Tensors must be contiguous.
    """
    rule = _rule(optimizer_name, _RULES_8BIT)
    if rule not in _TWO_STATE:
        state2s = absmax2s = [None] * len(ps)
    _check_multi(gs, ps, [("state1s", state1s), ("state2s", state2s), ("absmax1s", absmax1s), ("absmax2s", absmax2s)])
    args = (beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2)
    small = []
    for g, p, s1, s2, a1, a2 in zip(gs, ps, state1s, state2s, absmax1s, absmax2s):
        if p.numel() >= _MULTI_MAX_NUMEL:
            optimizer_update_8bit_blockwise(optimizer_name, g, p, s1, s2, *args, a1, a2, weight_decay, gnorm_scale,
                                            skip_zeros)  # fmt: skip
        elif p.numel() > 0:
            small.append((g, p, s1, s2, a1, a2))
    if not small:
        return
    device = small[0][1].device
    qmap1_, tables1 = _search_tables(qmap1, device, signed=True)
    qmap2_, tables2 = _search_tables(qmap2, device, signed=False) if rule in _TWO_STATE else (qmap1_, tables1)
    tiles = [triton.cdiv(num_blocks(p.numel(), STATE_BLOCK), _BLOCKS_PER_PROGRAM) for _, p, *_ in small]
    table = _pointer_table(tiles, [p.numel() for _, p, *_ in small], [list(c) for c in zip(*small)], device)
    g0, p0, c0, _, a0, _ = small[0]
    _update_8bit_kernel[(sum(tiles),)](
        g0, p0, c0, c0, a0, a0, qmap1_, tables1, qmap2_, tables2, table, len(small), 0,
        RULE=rule, SKIP_ZEROS=bool(skip_zeros), MULTI=True, LOG_TENSORS=(len(small) - 1).bit_length(),
        P_DTYPE=_TL_DTYPES[p0.dtype], BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM,
        EVEN=all(p.numel() % (_BLOCKS_PER_PROGRAM * STATE_BLOCK) == 0 for _, p, *_ in small),
        SCALE_GRAD=_scale_grad(rule, gnorm_scale),
        ALIGNED=all(t.data_ptr() % 16 == 0 for g, p, s1, s2, _, _ in small for t in (g, p, s1, s2) if t is not None),
        INTERPRET=interpreting(), num_warps=_WARPS_8BIT, SHARED_SEARCH=_SHARED_SEARCH,
        **_scalars(beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale), **_launch_options(device),
    )  # fmt: skip
