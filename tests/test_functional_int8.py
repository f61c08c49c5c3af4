"""functional LLM.int8() API: bitsandbytes compatibility and errors."""

import pytest
import torch

import tritonbits.functional as F


@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("shape", [(1, 64), (33, 96), (2, 5, 48)])
def test_vectorwise_quant_matches_bitsandbytes(bnb_ref, rng, threshold, shape):
    x = torch.randn(shape, generator=rng).half() * 1.5
    q, stats, cols = F.int8_vectorwise_quant(x, threshold)
    # bitsandbytes' CPU path only takes 2-D input; compare on the [rows, K] view.
    bq, bstats, bcols = bnb_ref.functional.int8_vectorwise_quant(x.reshape(-1, shape[-1]).clone(), threshold)
    assert torch.equal(stats, bstats)
    assert torch.equal(q.reshape(-1, shape[-1]), bq)
    assert (cols is None) == (bcols is None)
    if cols is not None:
        assert torch.equal(cols, bcols)
    theirs = bnb_ref.functional.int8_vectorwise_dequant(q.reshape(-1, shape[-1]), stats)
    assert torch.equal(F.int8_vectorwise_dequant(q, stats).reshape(theirs.shape), theirs)


def test_input_not_modified(rng):
    x = torch.randn(8, 16, generator=rng)
    x[1, 2] = 10
    before = x.clone()
    F.int8_vectorwise_quant(x, 6.0)
    F.int8_double_quant(x, threshold=6.0)
    assert torch.equal(x, before)


def test_matmul_pipeline_matches_bitsandbytes(bnb_ref, rng):
    a = torch.randn(16, 128, generator=rng).half()
    w = torch.randn(64, 128, generator=rng).half()
    qa, sa, _ = F.int8_vectorwise_quant(a)
    qw, sw, _ = F.int8_vectorwise_quant(w)
    acc = F.int8_linear_matmul(qa, qw)
    assert torch.equal(acc, bnb_ref.functional.int8_linear_matmul(qa, qw))
    bias = torch.randn(64, generator=rng).half()
    out = F.int8_mm_dequant(acc, sa, sw, bias=bias)
    theirs = bnb_ref.functional.int8_mm_dequant(acc, sa, sw, bias=bias)
    assert out.dtype == torch.float16
    # bitsandbytes scales by 6.200124e-05 (1.8e-5 above 1/127**2); we use the exact value.
    assert torch.allclose(out.float(), theirs.float(), rtol=2e-3, atol=2e-3)
    scaled = F.int8_scaled_mm(qa, qw, sa, sw, bias=bias, dtype=torch.float32)
    ref = a.double() @ w.double().t() + bias.double()
    assert (scaled.double() - ref).norm() / ref.norm() < 0.02


def test_double_quant_rows_match_vectorwise(rng):
    # bitsandbytes 0.50.2 has no CPU int8_double_quant; its row half is int8_vectorwise_quant.
    x = torch.randn(24, 40, generator=rng).half()
    x[3, 9] = 12
    row_q, col_q, row_s, col_s, cols = F.int8_double_quant(x, threshold=6.0)
    q, s, c = F.int8_vectorwise_quant(x, threshold=6.0)
    assert torch.equal(row_q, q) and torch.equal(row_s, s) and torch.equal(cols, c)
    # Column half: the same quantization applied to the transpose, outliers excluded.
    masked = x.masked_fill(x.abs() >= 6.0, 0)
    assert torch.equal(col_s, masked.float().abs().amax(0))
    assert torch.equal(col_q, torch.round(masked.mul(127.0) / col_s.unsqueeze(0)).to(torch.int8))


def test_linear_matmul_out_and_batch(rng):
    a = torch.randint(-127, 128, (2, 3, 32), generator=rng, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 32), generator=rng, dtype=torch.int8)
    out = torch.empty(2, 3, 5, dtype=torch.int32)
    assert F.int8_linear_matmul(a, b, out=out) is out
    assert torch.equal(out, (a.long() @ b.long().t()).int())


class TestErrors:
    def test_matmul_dtypes(self):
        with pytest.raises(ValueError, match="A must be int8"):
            F.int8_linear_matmul(torch.ones(2, 4), torch.ones(3, 4, dtype=torch.int8))
        with pytest.raises(ValueError, match="share K"):
            F.int8_linear_matmul(torch.ones(2, 4, dtype=torch.int8), torch.ones(3, 5, dtype=torch.int8))

    def test_threshold(self):
        with pytest.raises(ValueError, match="threshold must be a non-negative number"):
            F.int8_vectorwise_quant(torch.ones(2, 4), threshold=-1.0)

    def test_preallocated(self):
        with pytest.raises(ValueError, match="row_stats must be None"):
            F.int8_double_quant(torch.ones(2, 4), row_stats=torch.ones(2))

    def test_mm_dequant_dtype(self):
        with pytest.raises(ValueError, match="A must be int32"):
            F.int8_mm_dequant(torch.ones(2, 4), torch.ones(2), torch.ones(4))


def test_no_output_columns():
    # N = 0 (and K = 0 for the dequantize): empty results of the right shapes, as the Triton
    # launchers give them; the references used to fail reshaping the empty last dimension.
    g = torch.Generator().manual_seed(0)
    A = torch.randint(-127, 128, (3, 5), generator=g, dtype=torch.int8)
    B = torch.empty(0, 5, dtype=torch.int8)
    assert F.int8_mm_dequant(torch.empty(3, 0, dtype=torch.int32), torch.rand(3, generator=g) + 0.1,
                             torch.empty(0)).shape == (3, 0)  # fmt: skip
    assert F.int8_scaled_mm(A, B, torch.rand(3, generator=g) + 0.1, torch.empty(0)).shape == (3, 0)
    assert F.int8_vectorwise_dequant(torch.empty(3, 0, dtype=torch.int8), torch.rand(3, generator=g)).shape == (3, 0)
