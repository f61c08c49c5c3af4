"""Reference blockwise 8-bit ops against float64 math."""

import pytest
import torch

from tritonbits._ops import REFERENCES
from tritonbits.codebooks import create_dynamic_map, create_linear_map, create_normal_map

quantize_blockwise = REFERENCES["quantize_blockwise"]
dequantize_blockwise = REFERENCES["dequantize_blockwise"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODES = {
    "dynamic": create_dynamic_map(),
    "unsigned_dynamic": create_dynamic_map(signed=False),
    "linear": create_linear_map(),
    "normal": create_normal_map(),
}


@pytest.mark.parametrize("code_name", list(CODES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 100, 256, 4096])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (5000,)])
def test_codes_are_nearest(rng, code_name, dtype, blocksize, shape):
    code = CODES[code_name]
    x = (torch.randn(shape, generator=rng) * 2).to(dtype)
    if code_name == "unsigned_dynamic":
        x = x.abs()
    q, absmax = quantize_blockwise(x, code, blocksize)
    assert q.shape == x.shape and q.dtype == torch.uint8
    n = x.numel()
    blocks = -(n // -blocksize)
    flat = torch.nn.functional.pad(x.reshape(-1).double(), (0, blocks * blocksize - n))
    assert torch.equal(absmax.double(), flat.view(blocks, blocksize).abs().amax(1))
    scaled = (x.reshape(-1).float() * (1.0 / absmax).repeat_interleave(blocksize)[:n]).double()
    distance = (scaled[:, None] - code.double()[None, :]).abs()
    chosen = distance.gather(1, q.reshape(-1, 1).long()).squeeze(1)
    # Nearest code, exactly: float32 midpoints decide, and float64 distances agree up to 1e-7.
    assert torch.all(chosen <= distance.min(1).values + 1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096, 333])
def test_dequantize_is_code_times_absmax(rng, dtype, blocksize):
    n = 5000
    q = torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8)
    absmax = torch.rand(-(n // -blocksize), generator=rng) + 0.01
    code = CODES["dynamic"]
    out = dequantize_blockwise(q, absmax, code, blocksize, dtype)
    expected = (code.double()[q.long()] * absmax.double().repeat_interleave(blocksize)[:n]).float().to(dtype)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_unsorted_code_is_supported(rng):
    code = CODES["dynamic"]
    perm = torch.randperm(256, generator=rng)
    shuffled = code[perm]
    x = torch.randn(1000, generator=rng)
    q_sorted, absmax = quantize_blockwise(x, code, 256)
    q_shuffled, absmax2 = quantize_blockwise(x, shuffled, 256)
    # Same decoded values whichever order the table is in.
    assert torch.equal(shuffled[q_shuffled.long()], code[q_sorted.long()])
    assert torch.equal(absmax, absmax2)


def test_non_contiguous_input(rng):
    x = torch.randn(64, 96, generator=rng).t()
    assert not x.is_contiguous()
    q, absmax = quantize_blockwise(x, CODES["dynamic"], 64)
    q2, absmax2 = quantize_blockwise(x.contiguous(), CODES["dynamic"], 64)
    assert torch.equal(q, q2) and torch.equal(absmax, absmax2)


def test_empty():
    q, absmax = quantize_blockwise(torch.empty(0, 5), CODES["dynamic"], 64)
    assert q.shape == (0, 5) and absmax.shape == (0,)
    assert dequantize_blockwise(q, absmax, CODES["dynamic"], 64, torch.float16).shape == (0, 5)
