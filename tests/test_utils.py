"""tritonbits.utils against bitsandbytes.utils: replace_linear, find_outlier_dims, packing, helpers."""

from __future__ import annotations

import pytest
import torch

from tritonbits import utils


def _net():
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU()),
        torch.nn.ModuleDict({"lm_head": torch.nn.Linear(4, 3), "proj": torch.nn.Linear(4, 2)}),
    )


class _Marked(torch.nn.Linear):
    pass


@pytest.mark.parametrize("copy_weights", [False, True])
def test_replace_linear_matches_bitsandbytes(bnb_ref, copy_weights):
    ours_in, theirs_in = _net(), _net()
    theirs_in.load_state_dict(ours_in.state_dict())
    old_weights = [m.weight for m in ours_in.modules() if isinstance(m, torch.nn.Linear)]
    ours = utils.replace_linear(ours_in, _Marked, copy_weights=copy_weights)
    theirs = bnb_ref.utils.replace_linear(theirs_in, _Marked, copy_weights=copy_weights)
    assert ours is ours_in
    kinds = [(n, type(m).__name__, getattr(m, "bias", 0) is None) for n, m in ours.named_modules()]
    assert kinds == [(n, type(m).__name__, getattr(m, "bias", 0) is None) for n, m in theirs.named_modules()]
    assert type(ours[2]["lm_head"]) is torch.nn.Linear  # skipped by default
    assert type(ours[2]["proj"]) is _Marked and type(ours[1][0]) is _Marked
    new_weights = [m.weight for m in ours.modules() if isinstance(m, _Marked)]
    same = [any(w is old for old in old_weights) for w in new_weights]
    assert same == [copy_weights] * 3


def test_replace_linear_post_processing_and_skip():
    calls = []

    class Tagged(torch.nn.Linear):
        def done(self, module):
            calls.append((self is module, module.out_features))

    net = torch.nn.Sequential(Tagged(3, 2), Tagged(2, 7))
    utils.replace_linear(net, _Marked, skip_modules=["1"], post_processing_function="done")
    assert type(net[0]) is _Marked and type(net[1]) is Tagged
    assert calls == [(True, 2)]  # old_layer.done(old_layer), once, only for replaced layers


@pytest.mark.parametrize("shape", [(7, 33), (64, 16), (5, 2)])
@pytest.mark.parametrize("reduction_dim", [0, 1])
@pytest.mark.parametrize("zscore,topk", [(4.0, None), (1.0, None), (4.0, 2)])
def test_find_outlier_dims_matches_bitsandbytes(rng, bnb_ref, shape, reduction_dim, zscore, topk):
    weight = torch.randn(shape, generator=rng)
    other_dim = 1 - reduction_dim
    planted = torch.randint(0, shape[other_dim], (1,), generator=rng).item()
    weight.select(other_dim, planted).mul_(30)  # one dimension with a far larger spread
    ours = utils.find_outlier_dims(weight, reduction_dim=reduction_dim, zscore=zscore, topk=topk)
    theirs = bnb_ref.utils.find_outlier_dims(weight, reduction_dim=reduction_dim, zscore=zscore, topk=topk)
    assert ours.dtype == torch.int64
    assert sorted(ours.tolist()) == sorted(theirs.tolist())
    n = shape[other_dim]
    # One outlier among n values reaches a z-score of at most (n - 1) / sqrt(n): check where it can.
    if topk is not None or (n - 1) / n**0.5 > 1.2 * zscore:
        assert planted in ours.tolist()


def test_find_outlier_dims_random_and_errors(rng):
    weight = torch.randn(4, 9, generator=rng)
    drawn = utils.find_outlier_dims(weight, topk=5, rdm=True)
    assert drawn.shape == (5,) and drawn.dtype == torch.int64 and int(drawn.max()) < 9
    with pytest.raises(ValueError, match="topk"):
        utils.find_outlier_dims(weight, rdm=True)
    with pytest.raises(ValueError, match="2-D"):
        utils.find_outlier_dims(torch.randn(3, generator=rng))


def test_pack_dict_round_trip_and_bytes(bnb_ref):
    source = {"quant_type": "nf4", "blocksize": 64, "shape": [3, 5], "dtype": "bfloat16", "note": "µ"}
    packed = utils.pack_dict_to_tensor(source)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, bnb_ref.utils.pack_dict_to_tensor(source))
    assert utils.unpack_tensor_to_dict(packed) == source == bnb_ref.utils.unpack_tensor_to_dict(packed)


def test_weight_format_mappings_agree_with_the_layer():
    from tritonbits.nn import linear8bit

    assert utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING == linear8bit.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING
    assert utils.INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[0] == "row"


def test_execute_and_return_and_sync_gpu():
    out, err = utils.execute_and_return("python -c \"import sys; print('a'); print('b', file=sys.stderr)\"")
    assert (out, err) == ("a", "b")
    utils.sync_gpu(torch.ones(2))  # a CPU tensor: nothing to wait for, must not raise
