"""Embedding4bit / EmbeddingNF4 / EmbeddingFP4: lookups, both decode paths, state dicts, copies."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from support import bnb_cpu_4bit_inexact
from tritonbits import functional as F
from tritonbits.nn import Embedding4bit, EmbeddingFP4, EmbeddingNF4, Params4bit


def quantized_embedding(rng, num, dim, device, dtype=torch.float32, **kwargs) -> Embedding4bit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-path warning of dims not a multiple of 64
        module = Embedding4bit(num, dim, dtype=dtype, **kwargs)
    with torch.no_grad():
        module.weight.copy_(torch.randn(num, dim, generator=rng).to(dtype))
    return module.to(device)


def table(module) -> torch.Tensor:
    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dim", [64, 128, 96, 10], ids=["dim64", "dim128", "dim96-slow", "dim10-slow"])
@pytest.mark.parametrize("index_shape", [(5,), (2, 3), (0,)], ids=["5", "2x3", "empty"])
def test_lookup_equals_rows_of_the_decoded_table(rng, device, dtype, quant_type, dim, index_shape):
    module = quantized_embedding(rng, 11, dim, device, dtype, quant_type=quant_type)
    index = torch.randint(0, 11, index_shape, generator=rng).to(device)
    out = module(index)
    assert out.shape == (*index_shape, dim) and out.dtype == dtype
    torch.testing.assert_close(out, table(module)[index], rtol=0, atol=0)  # same codes, same decode: exact


def test_lookup_approximates_the_dense_table(rng):
    dense = torch.randn(16, 128, generator=rng)
    module = EmbeddingNF4(16, 128)
    module.load_state_dict({"weight": dense})
    module = module.cpu()
    index = torch.arange(16)
    error = (module(index) - dense).norm() / dense.norm()
    assert 0.0 < error < 0.15  # NF4 on Gaussian rows: ~0.1 relative error


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float16, torch.float32], ids=str)
def test_quant_storage_gives_the_same_lookups(rng, quant_storage):
    reference = quantized_embedding(rng, 8, 64, "cpu", quant_type="nf4")
    module = quantized_embedding(rng, 8, 64, "cpu", quant_type="nf4", quant_storage=quant_storage)
    assert module.weight.dtype == quant_storage
    index = torch.tensor([[0, 7], [3, 3]])
    torch.testing.assert_close(module(index), table(module)[index], rtol=0, atol=0)
    # re-quantizing a decoded table reproduces its codes: every storage dtype must decode alike
    with torch.no_grad():
        module = Embedding4bit(8, 64, quant_type="nf4", quant_storage=quant_storage)
        module.weight.copy_(table(reference))
    module = module.cpu()
    torch.testing.assert_close(module(index), reference(index), rtol=0, atol=0)


def test_shorthands_and_defaults():
    assert EmbeddingNF4(4, 64).weight.quant_type == "nf4"
    assert EmbeddingFP4(4, 64).weight.quant_type == "fp4"
    module = Embedding4bit(4, 64)
    assert module.weight.quant_type == "fp4" and not module.weight.compress_statistics
    assert not module.weight.bnb_quantized and module.dtype == torch.float32
    with pytest.warns(UserWarning, match="not a multiple of the blocksize"):
        Embedding4bit(4, 96)


def test_unquantized_forward_raises():
    with pytest.raises(RuntimeError, match="not quantized"):
        Embedding4bit(4, 64)(torch.tensor([0]))


def test_state_dict_round_trip_into_fresh_module(rng, device):
    module = quantized_embedding(rng, 12, 64, device, quant_type="nf4")
    state = module.state_dict()
    assert list(state) == ["weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
    assert state["weight"].shape == (12 * 64 // 2, 1)
    fresh = EmbeddingNF4(12, 64, device=device)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    index = torch.randint(0, 12, (4, 2), generator=rng).to(device)
    torch.testing.assert_close(fresh(index), module(index), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "cpu", "to_dtype"])
def test_round_trips_keep_table_exact(rng, how):
    module = quantized_embedding(rng, 9, 64, "cpu", quant_type="fp4", quant_storage=torch.bfloat16)
    packed = module.weight.data.clone()
    index = torch.arange(9)
    expected = module(index)
    if how == "deepcopy":
        other = copy.deepcopy(module)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(module))
    elif how == "cpu":
        other = module.cpu()
    else:
        other = module.to(torch.float16)  # bfloat16 words hold codes: not cast
    assert isinstance(other.weight, Params4bit) and other.weight.module is other
    assert torch.equal(other.weight.data.view(torch.uint8), packed.view(torch.uint8))
    assert other.weight.quant_state == module.weight.quant_state
    torch.testing.assert_close(other(index), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dim", [64, 96], ids=["dim64", "dim96"])
def test_matches_bitsandbytes(rng, bnb_ref, quant_type, dim):
    if dim % 64 and (why := bnb_cpu_4bit_inexact()):
        pytest.skip(why)
    dense = torch.randn(10, dim, generator=rng)
    index = torch.randint(0, 10, (3, 4), generator=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb_ref.nn.Embedding4bit(10, dim, quant_type=quant_type)
        ours = Embedding4bit(10, dim, quant_type=quant_type)
    theirs.load_state_dict({"weight": dense})
    ours.load_state_dict({"weight": dense})
    theirs, ours = theirs.to("cpu"), ours.to("cpu")
    # fp4 codes of tiny values may differ in the sign of zero; both decode to 0.0
    torch.testing.assert_close(ours(index), theirs(index), rtol=0, atol=0)
