"""The decode pack of Linear4bit (tritonbits/nn/compiled_decode.py): a compiled forward at decode
sizes reads the weight, its absmax and one meta tensor, gives the functional gemv's output bit for
bit (the eager layer's within rounding: on GPU it may launch another kernel configuration), and
never uses scales that no longer describe the weight."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from tritonbits import functional as F
from tritonbits.nn import Linear4bit
from tritonbits.nn.compiled_decode import PACK_KEY, pack_ints, refresh_decode_pack


def _layer(rng, device="cpu", bias=True, **kwargs) -> Linear4bit:
    dense = torch.nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(48, 64, generator=rng) * 0.1)
        if bias:
            dense.bias.copy_(torch.randn(48, generator=rng))
    layer = Linear4bit(64, 48, bias=bias, **kwargs)
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)


class GraphInputs:
    """A torch.compile backend that records the tensors each traced graph takes, then runs it."""

    def __init__(self):
        self.inputs: list[list[torch.Tensor]] = []

    def __call__(self, gm, example_inputs):
        self.inputs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [(1,), (3, 5)], ids=["1row", "3x5"])
def test_compiled_decode_matches_eager(rng, fresh_dynamo, nested, quant_type, dtype, rows):
    layer = _layer(rng, compress_statistics=nested, quant_type=quant_type, compute_dtype=dtype)
    record = GraphInputs()
    compiled = torch.compile(layer, fullgraph=True, backend=record)
    x = torch.randn(*rows, 64, generator=rng).to(dtype)
    state = layer.weight.quant_state
    with torch.no_grad():
        out = compiled(x)
        functional = F.gemv_4bit(x, layer.weight.t(), state=state) + layer.bias.to(dtype)
        torch.testing.assert_close(out, functional, rtol=0, atol=0)
        torch.testing.assert_close(out, layer(x), rtol=0, atol=2 * torch.finfo(dtype).eps * layer(x).abs().max().item())
    # the graph's tensors: x, the packed weight, absmax, meta and the bias; nothing else of the state
    (inputs,) = record.inputs
    _, meta = layer.__dict__[PACK_KEY]
    assert {id(t) for t in inputs} == {id(x), id(layer.weight), id(state.absmax), id(meta), id(layer.bias)}


def test_pack_follows_the_weight(rng):
    layer = Linear4bit(64, 48, quant_type="nf4")
    assert layer.__dict__.get(PACK_KEY) is None  # not quantized: nothing to pack
    layer.quantize_()
    absmax, meta = layer.__dict__[PACK_KEY]
    state = layer.weight.quant_state
    assert absmax is state.absmax
    s2 = state.state2
    expected = torch.cat([state.offset.reshape(1), state.code, s2.code, s2.absmax])
    assert torch.equal(meta.reshape(-1), expected)
    assert pack_ints(meta) == {
        "stamp": state._stamp, "out_features": 48, "in_features": 64, "blocksize": 64,
        "inner_blocksize": 256, "code_size": 16, "inner_code_size": 256,
    }  # fmt: skip
    # moving reassigns the state's tensors: the pack is rebuilt from the moved ones
    moved = layer.to("cpu")
    assert moved.__dict__[PACK_KEY][0] is moved.weight.quant_state.absmax
    assert pack_ints(moved.__dict__[PACK_KEY][1])["stamp"] == moved.weight.quant_state._stamp
    # a copy's QuantState is another state, with its own stamp and a pack of its own
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        copied_absmax, copied_meta = copied.__dict__[PACK_KEY]
        assert copied.weight.quant_state._stamp not in (state._stamp, s2._stamp)
        assert copied_absmax is copied.weight.quant_state.absmax and copied_absmax is not absmax
        assert pack_ints(copied_meta)["stamp"] == copied.weight.quant_state._stamp
    # not part of the state dict
    assert not any(PACK_KEY in key or "meta" in key for key in layer.state_dict())


def test_a_pack_never_serves_another_state_with_the_same_tensors(rng, fresh_dynamo):
    # the weight's QuantState replaced by a copy: same values, other tensors, a new stamp
    layer = _layer(rng, compress_statistics=False, quant_type="nf4", compute_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 64, generator=rng)
    with torch.no_grad():
        compiled(x)
        layer.weight.quant_state = copy.deepcopy(layer.weight.quant_state)
        layer.weight.quant_state.absmax.mul_(2)  # in place, in the copy only
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
        assert layer.__dict__[PACK_KEY][0] is layer.weight.quant_state.absmax


def test_the_stamp_follows_the_nested_state():
    state = F.quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)[1]
    inner = state.state2
    stamps = {state._stamp}
    for change in (lambda: setattr(inner, "absmax", inner.absmax * 2), lambda: setattr(inner, "code", inner.code),
                   lambda: inner.to("cpu"), lambda: setattr(state, "state2", copy.deepcopy(inner))):  # fmt: skip
        change()
        assert state._stamp not in stamps
        stamps.add(state._stamp)
    # a state that no longer holds the inner one is not restamped by it
    old_inner, state.state2 = state.state2, None
    stamp = state._stamp
    old_inner.absmax = old_inner.absmax + 1
    assert state._stamp == stamp
    # copies link their own nested state
    copied = copy.deepcopy(copy.deepcopy(F.quantize_4bit(torch.randn(64, 64), compress_statistics=True)[1]))
    stamp = copied._stamp
    copied.state2.absmax = copied.state2.absmax * 2
    assert copied._stamp != stamp


@pytest.mark.parametrize("change", ["offset", "inner absmax", "to()"])
def test_compiled_forward_never_uses_a_stale_pack(rng, fresh_dynamo, change):
    layer = _layer(rng, compress_statistics=True, quant_type="nf4", compute_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64, generator=rng)
    with torch.no_grad():
        before = compiled(x)
        state = layer.weight.quant_state
        old_meta = layer.__dict__[PACK_KEY][1]
        if change == "offset":
            state.offset = state.offset + 0.5
        elif change == "inner absmax":
            state.state2.absmax = state.state2.absmax * 2
        else:
            state.to("cpu")  # reassigns every tensor (same device: the same values)
        after = compiled(x)  # traced again: the pack no longer matches the state
        eager = layer(x)  # the eager forward rebuilds the pack
        torch.testing.assert_close(after, eager, rtol=0, atol=0)
        if change != "to()":
            assert not torch.equal(after, before)
        assert layer.__dict__[PACK_KEY][1] is not old_meta
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def test_gradients_take_the_general_path(rng, fresh_dynamo):
    layer = _layer(rng, compress_statistics=True, quant_type="nf4", compute_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 64, generator=rng, requires_grad=True)
    compiled(x).sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    layer(x_eager).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


def test_refresh_without_a_quantized_weight_drops_the_pack(rng):
    layer = _layer(rng)
    assert layer.__dict__[PACK_KEY] is not None
    layer.weight = torch.nn.Parameter(torch.zeros(48, 64), requires_grad=False)  # not a Params4bit
    refresh_decode_pack(layer)
    assert PACK_KEY not in layer.__dict__
