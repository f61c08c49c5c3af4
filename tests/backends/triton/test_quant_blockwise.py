"""Triton blockwise 8-bit kernels against the PyTorch reference: codes and absmax bit for bit."""

from __future__ import annotations

import pytest
import torch

from tritonbits.codebooks import create_linear_map, dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 100 is not a power of two: the kernel pads each block's row of the tile and masks the rest.
BLOCKSIZES = [64, 100, 256, 4096]
SHAPES = [(1,), (63,), (777,), (37, 129), (10000,)]


def _random(shape, dtype, rng, device, scale=3.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


def _check_quantize(launcher, reference, A, code, blocksize):
    codes, absmax = launcher("quantize_blockwise")(A, code, blocksize)
    ref_codes, ref_absmax = reference("quantize_blockwise")(A, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == A.shape
    assert torch.equal(absmax, ref_absmax)  # exact: max |x| is order-independent
    assert torch.equal(codes, ref_codes)  # exact: same float32 scaling and midpoints
    return codes, absmax


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_match_reference(launcher, reference, rng, device, dtype, blocksize, shape):
    A = _random(shape, dtype, rng, device)
    code = dynamic_map(device)
    codes, absmax = _check_quantize(launcher, reference, A, code, blocksize)

    out = launcher("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    expected = reference("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    assert out.dtype == dtype and out.shape == A.shape
    assert torch.equal(out, expected)  # exact: float32 product, round-to-nearest-even cast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unsorted_code_with_duplicates(launcher, reference, rng, device, dtype):
    # Any 256-entry code: shuffled, with repeated values (equal midpoints in the search tree).
    code = torch.rand(256, generator=rng) * 2 - 1
    code[10:20] = code[5]
    code = code[torch.randperm(256, generator=rng)].to(device)
    _check_quantize(launcher, reference, _random((3000,), dtype, rng, device), code, 256)


def test_ties_go_to_the_smaller_entry(launcher, reference, device):
    # With a linear code and absmax exactly 1, values equal to a midpoint are exact ties.
    code = create_linear_map(signed=True).to(device)
    sorted_code = code.sort().values
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    A = torch.cat([torch.ones(1, device=device), midpoints, -midpoints]).float()
    codes, _ = _check_quantize(launcher, reference, A, code, 4096)
    assert torch.equal(code[codes[1:256].long()], sorted_code[:-1])


def test_zero_blocks_and_constant_blocks(launcher, reference, rng, device):
    A = _random((1024,), torch.float32, rng, device)
    A[:256] = 0.0  # all-zero block: absmax 0, codes of 0.0 (no NaN)
    A[256:512] = -2.5  # constant block: every value is -absmax
    _check_quantize(launcher, reference, A, dynamic_map(device), 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(launcher, reference, rng, device, dtype):
    A = _random((64, 90), dtype, rng, device).t()[:, ::3]  # transposed and strided
    assert not A.is_contiguous()
    _check_quantize(launcher, reference, A, dynamic_map(device), 64)


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=str)
def test_empty_input(launcher, device, shape):
    A = torch.empty(shape, device=device)
    codes, absmax = launcher("quantize_blockwise")(A, dynamic_map(device), 64)
    assert codes.shape == shape and codes.dtype == torch.uint8 and absmax.shape == (0,)
    out = launcher("dequantize_blockwise")(codes, absmax, dynamic_map(device), 64, torch.float16)
    assert out.shape == shape and out.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_random_codes(launcher, reference, rng, device, dtype):
    blocksize = 128
    codes = torch.randint(0, 256, (50, 77), generator=rng, dtype=torch.uint8).to(device)
    absmax = (torch.rand(-(codes.numel() // -blocksize), generator=rng) * 10 + 0.1).to(device)
    code = torch.randn(256, generator=rng).to(device)
    out = launcher("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    assert torch.equal(out, reference("dequantize_blockwise")(codes, absmax, code, blocksize, dtype))  # exact


def test_very_large_blocksize_falls_back_to_reference(launcher, reference, rng, device, monkeypatch):
    import tritonbits.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_warned", set())
    A = _random((1000,), torch.float32, rng, device)
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        codes, absmax = launcher("quantize_blockwise")(A, dynamic_map(device), 32768)
    ref_codes, ref_absmax = reference("quantize_blockwise")(A, dynamic_map(device), 32768)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
