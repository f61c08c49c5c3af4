"""Triton kernels for blockwise 8-bit quantization with any 256-entry code.

Format and rounding are those of ``backends/torch/quant_blockwise.py`` (bit-identical): blocks of
``blocksize`` elements of the flattened input, a float32 absmax per block, and per element the
index of the code entry nearest to ``x * (1 / absmax)``, ties going to the smaller entry.

Finding the nearest entry is a search over the 255 float32 midpoints of the sorted code. The
launcher lays the midpoints out as an implicit binary tree in breadth-first (Eytzinger) order:
node ``i`` has children ``2i`` and ``2i + 1``, so the first levels every element visits sit in
the same one or two cache lines and the 8-step search touches few lines per warp. After the walk
``i - 256`` is the number of midpoints below ``x``, which ``order`` maps back to the unsorted
code's index.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..._ops import num_blocks
from ..torch import quant_blockwise as reference
from . import cast_rtne, interpreting, warn_once

# Elements one program handles: enough to amortize the absmax reduction and keep 16-byte loads.
_TILE = 4096
# Largest (padded) block kept whole in one program's registers; larger blocks use the reference.
_MAX_BLOCK = 16384
_CODE_SIZE = 256


@triton.jit
def _quantize_blockwise_kernel(
    a_ptr,
    tree_ptr,
    order_ptr,
    codes_ptr,
    absmax_ptr,
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    # A [BLOCKS_PER_PROGRAM, BLOCK_PAD] tile: one quantization block per row, so the absmax is a
    # row reduction in registers and the input is read once.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_PAD)
    offsets = blocks[:, None] * BLOCKSIZE + cols[None, :]
    mask = (cols[None, :] < BLOCKSIZE) & (offsets < n)
    x = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    # Clamping to float32 tiny (2**-126) makes all-zero blocks give zeros instead of NaN.
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, 1.1754943508222875e-38))
    scaled = x * inverse[:, None]

    # Eytzinger walk: go right unless scaled <= node (NaN goes right, as torch.bucketize puts it last).
    node = tl.full(scaled.shape, 1, tl.int32)
    for _ in tl.static_range(8):  # log2(256) levels, one per bit of the result
        threshold = tl.load(tree_ptr + node)
        node = 2 * node + 1 - (scaled <= threshold).to(tl.int32)
    code_index = tl.load(order_ptr + (node - 256))
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


@lru_cache(maxsize=None)
def _eytzinger_order() -> tuple[int, ...]:
    """Sorted-midpoint index held by each node 1..255 of the tree (entry 0 is unused)."""
    layout = [0] * _CODE_SIZE
    next_sorted = iter(range(_CODE_SIZE - 1))

    def fill(node: int) -> None:  # in-order traversal visits the keys in ascending order
        if node < _CODE_SIZE:
            fill(2 * node)
            layout[node] = next(next_sorted)
            fill(2 * node + 1)

    fill(1)
    return tuple(layout)


@lru_cache(maxsize=None)
def _eytzinger_index(device: torch.device) -> torch.Tensor:
    return torch.tensor(_eytzinger_order(), dtype=torch.int64, device=device)


def search_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """256-entry code -> (float32 midpoint tree [256], uint8 sorted-rank -> code index [256]).

    Same sort and midpoints as the reference's ``nearest_code``; device ops only, no host sync.
    """
    sorted_code, order = torch.sort(code.float().reshape(-1), stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints[_eytzinger_index(code.device)].contiguous(), order.to(torch.uint8)


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
    tree, order = search_tables(code.to(A.device))
    blocks_per_program = min(max(1, _TILE // block_pad), triton.next_power_of_2(absmax.numel()))
    grid = (triton.cdiv(absmax.numel(), blocks_per_program),)
    _quantize_blockwise_kernel[grid](
        A.contiguous(),
        tree,
        order,
        codes,
        absmax,
        n,
        absmax.numel(),
        BLOCKSIZE=blocksize,
        BLOCK_PAD=block_pad,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        num_warps=8 if block_pad * blocks_per_program >= 8192 else 4,
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
