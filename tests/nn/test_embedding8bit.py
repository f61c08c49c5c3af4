"""Embedding8bit: lookups from int8 rows against float math and the real bitsandbytes."""

from __future__ import annotations

import inspect

import pytest
import torch

from tritonbits.nn.embedding8bit import Embedding8bit

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (num_embeddings, embedding_dim, index shape): odd sizes, 0-d, 2-D and empty index tensors.
SHAPES = [(1, 7, (3,)), (37, 33, (2, 5)), (64, 16, ()), (10, 8, (0,))]


def _table(rng, n, d, dtype):
    return (torch.randn(n, d, generator=rng) * torch.rand(n, 1, generator=rng) * 4).to(dtype)


def _quantized(cls, table):
    module = cls(*table.shape, dtype=table.dtype)
    module.load_state_dict({"weight": table})
    return module.to("cpu")  # the move quantizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,index_shape", SHAPES)
def test_lookup_matches_float_and_bitsandbytes(rng, bnb_ref, dtype, n, d, index_shape):
    table = _table(rng, n, d, dtype)
    ours, theirs = _quantized(Embedding8bit, table), _quantized(bnb_ref.nn.Embedding8bit, table)
    assert ours.weight.dtype == torch.int8 and ours.weight.SCB.shape == (n,)
    assert torch.equal(ours.weight.data, theirs.weight.data) and torch.equal(ours.weight.SCB, theirs.weight.SCB)
    index = torch.randint(0, n, index_shape, generator=rng)
    out = ours(index)
    assert out.shape == (*index_shape, d) and out.dtype == dtype
    assert torch.equal(out, theirs(index))  # the same three operations as bitsandbytes

    rows = table.float()[index].double()
    absmax = table.float().abs().amax(1)[index].double().unsqueeze(-1)
    # round-to-nearest int8 per row: at most half a step (absmax / 254), plus the output's rounding
    bound = absmax / 254 + torch.finfo(dtype).eps * rows.abs() + 1e-7
    assert torch.all((out.double() - rows).abs() <= bound)


def test_noncontiguous_index(rng):
    module = _quantized(Embedding8bit, _table(rng, 20, 6, torch.float16))
    index = torch.randint(0, 20, (4, 5), generator=rng).t()
    assert not index.is_contiguous()
    assert torch.equal(module(index), module(index.contiguous()))


def test_unquantized_table_raises(rng):
    module = Embedding8bit(5, 4)
    with pytest.raises(RuntimeError, match="not quantized"):
        module(torch.tensor([1, 2]))


def test_saving_not_supported_like_bitsandbytes(rng):
    module = _quantized(Embedding8bit, _table(rng, 5, 4, torch.float32))
    with pytest.raises(NotImplementedError, match="Saving Embedding8bit"):
        module.state_dict()


def test_signature_and_defaults_match_bitsandbytes(bnb_ref):
    ours = inspect.signature(Embedding8bit.__init__).parameters
    theirs = inspect.signature(bnb_ref.nn.Embedding8bit.__init__).parameters
    assert list(ours) == list(theirs) and [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    module = Embedding8bit(5, 4, dtype=torch.bfloat16)
    assert module.dtype == torch.bfloat16 and not module.weight.requires_grad
    assert module.weight.has_fp16_weights is False


def test_moving_again_keeps_scales_with_codes(rng):
    module = _quantized(Embedding8bit, _table(rng, 9, 4, torch.float32))
    index = torch.arange(9)
    before = module(index)
    module.to("cpu")
    assert module.weight.SCB.device == module.weight.device and torch.equal(module(index), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_lookup_matches_bitsandbytes(rng, bnb_ref):
    table = _table(rng, 1000, 128, torch.float16)
    ours = Embedding8bit(1000, 128, dtype=torch.float16)
    theirs = bnb_ref.nn.Embedding8bit(1000, 128, dtype=torch.float16)
    for module in (ours, theirs):
        module.load_state_dict({"weight": table})
        module.cuda()
    index = torch.randint(0, 1000, (4, 64), generator=rng).cuda()
    assert ours.weight.device.type == "cuda" and torch.equal(ours.weight.SCB, theirs.weight.SCB)
    # bitsandbytes' CUDA kernel may round a float32 tie the other way: at most one step (absmax/127)
    # apart, plus float16 output rounding
    step = ours.weight.SCB[index].unsqueeze(-1).float() / 127
    diff = (ours(index).float() - theirs(index).float()).abs()
    assert torch.all(diff <= step + 1e-3 * theirs(index).float().abs())
