"""A tiny Triton kernel that proves Triton can compile and run code on a device.

Imported only by the diagnostics' compile check, since importing it imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * alpha + y, mask=mask)


def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x * alpha + y`` for contiguous float32 tensors of one shape, computed by Triton."""
    out = torch.empty_like(x)
    n = x.numel()
    block = 128
    _scaled_add_kernel[(triton.cdiv(n, block),)](x, y, out, n, alpha, BLOCK=block)
    return out
