"""Triton LLM.int8() row-wise quantization kernels against the PyTorch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (2, 9000) is wider than one register tile: the kernel reads rows in chunks, twice.
SHAPES = [(1, 300), (7, 33), (3, 5, 64), (20, 1000), (2, 9000)]
# 6.1016 is not a float16/bfloat16 value: the comparison must happen in A's dtype, as torch does.
THRESHOLDS = [0.0, 2.5, 6.1016]


def _random(shape, dtype, rng, device, scale=2.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


def _check_quant(launcher, reference, A, threshold):
    out, stats, cols = launcher("int8_vectorwise_quant")(A, threshold)
    ref_out, ref_stats, ref_cols = reference("int8_vectorwise_quant")(A, threshold)
    assert out.dtype == torch.int8 and out.shape == A.shape
    assert torch.equal(stats, ref_stats)  # exact: max |x| of the non-outliers
    assert torch.equal(out, ref_out)  # exact: same float32 scale, round half to even
    if ref_cols is None:
        assert cols is None
    else:
        assert torch.equal(cols, ref_cols)
    return out, stats


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_and_dequant_match_reference(launcher, reference, rng, device, dtype, shape, threshold):
    A = _random(shape, dtype, rng, device)
    out, stats = _check_quant(launcher, reference, A, threshold)
    restored = launcher("int8_vectorwise_dequant")(out, stats)
    assert restored.dtype == torch.float32 and restored.shape == A.shape
    assert torch.equal(restored, reference("int8_vectorwise_dequant")(out, stats))  # exact


def test_exact_halves_round_to_even(launcher, reference, device):
    # absmax 127 gives scale exactly 1: x * scale = x, so these are exact .5 ties.
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], device=device)
    out, _ = _check_quant(launcher, reference, row.view(1, -1), 0.0)
    assert out.view(-1).tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


def test_zero_rows_and_all_outlier_rows(launcher, reference, rng, device):
    A = _random((6, 50), torch.float16, rng, device)
    A[1] = 0.0  # absmax 0: codes 0, stats 0
    A[3] = 10.0  # every entry an outlier at threshold 5: stats 0, every column an outlier column
    _check_quant(launcher, reference, A, 5.0)
    _check_quant(launcher, reference, A, 0.0)


def test_single_row_keeps_outlier_columns(launcher, reference, rng, device):
    # With one row only the outlier entries themselves are zeroed (the reference's rule).
    A = _random((1, 200), torch.bfloat16, rng, device)
    _check_quant(launcher, reference, A, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(launcher, reference, rng, device, dtype):
    A = _random((70, 24), dtype, rng, device).t()
    assert not A.is_contiguous()
    _check_quant(launcher, reference, A, 3.0)


def test_empty_input(launcher, device):
    A = torch.empty((0, 16), dtype=torch.float16, device=device)
    out, stats, cols = launcher("int8_vectorwise_quant")(A, 0.0)
    assert out.shape == (0, 16) and stats.shape == (0,) and cols is None
    assert launcher("int8_vectorwise_dequant")(out, stats).shape == (0, 16)


def test_dequant_random_codes(launcher, reference, rng, device):
    A = torch.randint(-127, 128, (3, 17, 65), generator=rng, dtype=torch.int8).to(device)
    stats = (torch.rand(51, generator=rng) * 20).to(device)
    assert torch.equal(
        launcher("int8_vectorwise_dequant")(A, stats), reference("int8_vectorwise_dequant")(A, stats)
    )  # exact
