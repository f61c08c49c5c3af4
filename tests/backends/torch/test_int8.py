"""Reference LLM.int8() ops against float64 math."""

import pytest
import torch

from tritonbits._ops import REFERENCES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (17, 33), (2, 3, 40)])
def test_vectorwise_quant_no_threshold(rng, dtype, shape):
    x = torch.randn(shape, generator=rng).to(dtype)
    q, stats, outliers = REFERENCES["int8_vectorwise_quant"](x, 0.0)
    assert outliers is None and q.shape == x.shape and q.dtype == torch.int8
    x2 = x.reshape(-1, shape[-1]).double()
    assert torch.equal(stats.double(), x2.abs().amax(1))
    expected = torch.round(x2 * (127.0 / stats.double())[:, None])
    # float32 scale then one rounding: matches the float64 result except where x*127/s is within
    # float32 rounding of a .5 tie (never in practice on random data; allow at most 1 step).
    assert (q.reshape(-1, shape[-1]).double() - expected).abs().max() <= 1
    assert q.abs().max() <= 127


def test_vectorwise_quant_outliers(rng):
    x = torch.randn(8, 32, generator=rng)
    x[2, 5] = 9.0
    x[6, 20] = -7.5
    q, stats, outliers = REFERENCES["int8_vectorwise_quant"](x, 6.0)
    assert outliers.tolist() == [5, 20]
    assert torch.all(q[:, [5, 20]] == 0), "outlier columns are zeroed in every row"
    masked = x.clone()
    masked[2, 5] = masked[6, 20] = 0
    assert torch.equal(stats, masked.abs().amax(1)), "outliers do not count in the row scale"


def test_vectorwise_quant_single_row_keeps_inliers(rng):
    x = torch.randn(1, 32, generator=rng)
    x[0, 3] = 10.0
    q, stats, outliers = REFERENCES["int8_vectorwise_quant"](x, 6.0)
    assert outliers.tolist() == [3] and q[0, 3] == 0 and torch.count_nonzero(q) > 20


def test_zero_row_gives_zeros():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    q, stats, _ = REFERENCES["int8_vectorwise_quant"](x, 0.0)
    assert torch.equal(q[0], torch.zeros(16, dtype=torch.int8)) and stats[0] == 0


def test_linear_matmul_exact(rng):
    a = torch.randint(-127, 128, (5, 300), generator=rng, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 300), generator=rng, dtype=torch.int8)
    out = REFERENCES["int8_linear_matmul"](a, b)
    assert out.dtype == torch.int32 and torch.equal(out, (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_mm_dequant(rng, dtype):
    acc = torch.randint(-(2**20), 2**20, (6, 9), generator=rng, dtype=torch.int32)
    row = torch.rand(6, generator=rng) * 3
    col = torch.rand(9, generator=rng) * 3
    bias = torch.randn(9, generator=rng)
    out = REFERENCES["int8_mm_dequant"](acc, row, col, dtype, bias)
    expected = acc.double() * row.double()[:, None] * col.double()[None, :] / 127**2 + bias.double()
    assert out.dtype == (dtype or torch.float16)
    rtol = {None: 1e-3, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]  # output rounding
    assert torch.allclose(out.double(), expected, rtol=rtol, atol=1e-3)


def test_scaled_mm_approximates_float_matmul(rng):
    a = torch.randn(16, 64, generator=rng)
    w = torch.randn(32, 64, generator=rng)
    qa, sa, _ = REFERENCES["int8_vectorwise_quant"](a, 0.0)
    qw, sw, _ = REFERENCES["int8_vectorwise_quant"](w, 0.0)
    out = REFERENCES["int8_scaled_mm"](qa, qw, sa, sw, None, torch.float32)
    ref = a.double() @ w.double().t()
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 0.02, f"int8 x int8 relative error {rel:.4f} (expected ~0.01)"


def test_double_quant(rng):
    x = torch.randn(12, 20, generator=rng).half()
    x[4, 7] = 8.0
    row_q, col_q, row_s, col_s, outliers = REFERENCES["int8_double_quant"](x, 6.0)
    assert outliers.tolist() == [7]
    masked = x.float().clone()
    masked[4, 7] = 0
    assert torch.equal(col_s, masked.abs().amax(0)) and torch.equal(row_s, masked.abs().amax(1))
    assert col_q.shape == x.shape and col_q.dtype == torch.int8 and col_q.abs().max() <= 127
    deq = col_q.double() * col_s.double()[None, :] / 127
    assert (deq - masked.double()).abs().max() <= col_s.max() / 127  # within one step of the column scale
