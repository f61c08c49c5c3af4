"""Reference blockwise 8-bit quantization with any 256-entry code (float32 math, any device).

Format (bitsandbytes'): the flattened input is cut into blocks of ``blocksize`` elements (the
last block may be shorter). Each block stores its absolute maximum as float32 (``absmax``), and
each element stores the index (uint8) of the code value nearest to ``x / absmax``.
"""

from __future__ import annotations

import torch

from ..._ops import register_reference


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| of a 1-D float32 tensor, as float32 of length ceil(n / blocksize).

    The tail is padded with zeros, which never change a maximum of absolute values.
    """
    n = flat.numel()
    blocks = -(n // -blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    return padded.view(blocks, blocksize).abs().amax(dim=1) if blocks else flat.new_empty(0)


def scale_by_block(flat: torch.Tensor, factors: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat[i] * factors[i // blocksize]`` for a 1-D tensor and one factor per block."""
    return flat * factors.repeat_interleave(blocksize)[: flat.numel()]


def normalize_by_block(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``flat`` (float32, 1-D) into blocks; return (x * (1 / absmax) per block, absmax).

    Multiplying by the reciprocal, as the GPU kernels do, rather than dividing keeps the codes
    bit-identical to theirs. All-zero blocks give zeros, not NaN.
    """
    absmax = block_absmax(flat, blocksize)
    inverse = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    return scale_by_block(flat, inverse, blocksize), absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the entry of ``code`` nearest to each value; ties go to the smaller value.

    ``code`` need not be sorted: it is sorted here and the indices mapped back.
    """
    sorted_code, order = torch.sort(code.float(), stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


@register_reference("quantize_blockwise")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (float16/bfloat16/float32, any shape) -> (uint8 codes shaped like A, float32 absmax [blocks])."""
    scaled, absmax = normalize_by_block(A.reshape(-1).float(), blocksize)
    codes = nearest_code(scaled, code.to(A.device)).to(torch.uint8)
    return codes.view(A.shape), absmax


@register_reference("dequantize_blockwise")
def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 codes (any shape) -> ``code[A] * absmax[block]`` in float32, cast to ``dtype``."""
    values = code.to(A.device).float()[A.reshape(-1).long()]
    return scale_by_block(values, absmax.float(), blocksize).to(dtype).view(A.shape)
