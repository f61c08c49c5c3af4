"""Linear4bit / LinearNF4 / LinearFP4 and Params4bit: forward, QLoRA backward, state dicts, copies."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import tritonbits as bnb
from tritonbits import functional as F
from tritonbits.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit
from support import EPS, assert_close_to

FLOATS = [torch.float16, torch.bfloat16, torch.float32]
# unit roundoff of each compute dtype; results pass through at most two roundings (matmul, bias)


def dense_linear(rng, in_features, out_features, bias=True, dtype=torch.float32) -> torch.nn.Linear:
    layer = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=rng) * 0.1)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=rng))
    return layer


def quantized_linear(rng, in_features, out_features, device, bias=True, **kwargs) -> Linear4bit:
    dense = dense_linear(rng, in_features, out_features, bias)
    layer = Linear4bit(in_features, out_features, bias=bias, **kwargs)
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)


def dequantized(layer: Linear4bit, dtype) -> torch.Tensor:
    """The layer's weight decoded by the functional API, rounded once to ``dtype``."""
    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().to(dtype)




def state_dict_packed(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].cpu().view(torch.uint8), b[key].cpu().view(torch.uint8)), key


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("compute_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_shape", [(1,), (5,), (2, 3)], ids=["1row", "5rows", "2x3"])
@pytest.mark.parametrize("features", [(64, 48), (33, 17)], ids=["64x48", "odd33x17"])
def test_forward_matches_dequantize_then_matmul(rng, device, compute_dtype, quant_type, bias, batch_shape, features):
    in_features, out_features = features
    layer = quantized_linear(rng, in_features, out_features, device, bias, quant_type=quant_type,
                             compute_dtype=compute_dtype)  # fmt: skip
    x = torch.randn(*batch_shape, in_features, generator=rng).to(device)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (*batch_shape, out_features) and out.dtype == x.dtype

    weight, x64 = dequantized(layer, compute_dtype).double(), x.to(compute_dtype).double()
    expected, magnitude = x64 @ weight.T, x64.abs() @ weight.abs().T
    if bias:
        b64 = layer.bias.to(compute_dtype).double()
        expected, magnitude = expected + b64, magnitude + b64.abs()
    assert_close_to(out.to(compute_dtype), expected, compute_dtype, magnitude, k=in_features)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "flat"])
def test_forward_approximates_the_dense_layer(rng, device, quant_type, compress_statistics):
    dense = dense_linear(rng, 256, 64).to(device)
    layer = Linear4bit(256, 64, quant_type=quant_type, compress_statistics=compress_statistics)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device)
    x = torch.randn(8, 256, generator=rng).to(device)
    with torch.no_grad():
        error = (layer(x) - dense(x)).norm() / (dense(x) - dense.bias).norm()
    # 4-bit codes of Gaussian weights: relative error ~0.1 (nf4) .. ~0.15 (fp4); 0.25 flags breakage
    assert 0.0 < error < 0.25


def test_nf4_and_fp4_shorthands(rng):
    assert LinearNF4(8, 4).weight.quant_type == "nf4"
    assert LinearFP4(8, 4).weight.quant_type == "fp4"
    assert Linear4bit(8, 4).weight.quant_type == "fp4"  # bitsandbytes' default
    assert Linear4bit(8, 4).weight.compress_statistics is True
    assert Linear4bit(8, 4).weight.blocksize == 64


def test_empty_and_non_contiguous_inputs(rng, device):
    layer = quantized_linear(rng, 32, 16, device, compute_dtype=torch.float32)
    with torch.no_grad():
        assert layer(torch.empty(0, 32, device=device)).shape == (0, 16)
        assert layer(torch.empty(2, 0, 32, device=device)).shape == (2, 0, 16)
        x = torch.randn(32, 6, generator=rng).to(device)
        out = layer(x.t())  # non-contiguous [6, 32]
        # BLAS may sum a transposed operand in another order: float32 rounding, not equality
        torch.testing.assert_close(out, layer(x.t().contiguous()), rtol=1e-5, atol=1e-6)


def test_compute_dtype_follows_bitsandbytes_rule(rng):
    layer = quantized_linear(rng, 32, 16, "cpu")
    assert layer.compute_dtype is None
    layer(torch.randn(2, 32, generator=rng, dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16  # adopted from the first input, then kept
    out = layer(torch.randn(2, 32, generator=rng))
    assert out.dtype == torch.float32  # output follows the input, computed in bfloat16

    layer16 = quantized_linear(rng, 32, 16, "cpu")
    with pytest.warns(UserWarning, match="float16"):
        layer16(torch.randn(2, 32, generator=rng, dtype=torch.float16))


def test_unquantized_forward_raises(rng):
    layer = Linear4bit(32, 16)
    with pytest.raises(RuntimeError, match="not quantized"):
        layer(torch.randn(2, 32, generator=rng))


# ---------------------------------------------------------------------------------------------
# backward (QLoRA: the weight is frozen, the input and the bias get gradients)


@pytest.mark.parametrize("compute_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_shape", [(1,), (2, 3)], ids=["1row", "2x3"])
def test_input_gradient_matches_float64_reference(rng, device, compute_dtype, bias, batch_shape):
    layer = quantized_linear(rng, 40, 24, device, bias, quant_type="nf4", compute_dtype=compute_dtype)
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(*batch_shape, 40, generator=rng).to(device=device, dtype=compute_dtype).requires_grad_()
    grad_out = torch.randn(*batch_shape, 24, generator=rng).to(device=device, dtype=compute_dtype)
    layer(x).backward(grad_out)

    weight, g64 = dequantized(layer, compute_dtype).double(), grad_out.double()
    assert_close_to(x.grad, g64 @ weight, compute_dtype, g64.abs() @ weight.abs(), k=24)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    if bias:
        rows = g64.reshape(-1, 24)
        assert_close_to(layer.bias.grad, rows.sum(0), compute_dtype, rows.abs().sum(0), k=rows.shape[0])


# ---------------------------------------------------------------------------------------------
# quantize on move, explicit quantize


def test_quantizes_on_move_not_on_construction(rng):
    layer = Linear4bit(64, 32, quant_type="nf4")
    assert not layer.weight.bnb_quantized and layer.weight.shape == (32, 64)
    layer.to(torch.bfloat16)  # a dtype alone is not a move
    assert not layer.weight.bnb_quantized and layer.weight.dtype == torch.bfloat16
    layer.to("cpu")  # bitsandbytes' CPU backend quantizes on .to("cpu") as well
    assert layer.weight.bnb_quantized and layer.weight.shape == (32 * 64 // 2, 1)
    assert layer.weight.dtype == torch.uint8
    assert layer.quant_state is layer.weight.quant_state and layer.quant_state.dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["cpu", "to_device", "quantize_", "params_quantize_"])
def test_every_way_to_quantize_gives_the_same_bytes(rng, how):
    dense = dense_linear(rng, 64, 32)
    layers = []
    for _ in range(2):
        layer = Linear4bit(64, 32, quant_type="nf4")
        layer.load_state_dict(dense.state_dict())
        layers.append(layer)
    reference = layers[0].cpu()
    layer = layers[1]
    if how == "cpu":
        layer = layer.cpu()
    elif how == "to_device":
        layer = layer.to(torch.device("cpu"))
    elif how == "quantize_":
        assert layer.quantize_() is layer
    else:
        layer.weight.quantize_()
    assert_same_state(state_dict_packed(layer), state_dict_packed(reference))
    packed = layer.weight.data.clone()
    layer.quantize_()  # already quantized: no-op
    assert torch.equal(layer.weight.data, packed)


def test_dtype_with_device_is_applied_before_quantizing(rng):
    layer = Linear4bit(64, 32).to("cpu", torch.float16)
    assert layer.weight.quant_state.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# state dict: bitsandbytes' format


@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_keys_and_layout(rng, quant_type, compress_statistics):
    layer = quantized_linear(rng, 64, 48, "cpu", quant_type=quant_type, compress_statistics=compress_statistics)
    state = layer.state_dict()
    expected = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    if compress_statistics:
        expected += ["weight.nested_absmax", "weight.nested_quant_map"]
    expected += [f"weight.quant_state.bitsandbytes__{quant_type}"]
    assert list(state) == expected
    assert type(state["weight"]) is torch.Tensor  # plain tensors, as safetensors wants
    assert state["weight"].shape == (64 * 48 // 2, 1) and state["weight"].dtype == torch.uint8
    assert state["weight.absmax"].dtype == (torch.uint8 if compress_statistics else torch.float32)
    assert state["weight.quant_map"].shape == (16,)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "flat"])
def test_load_quantized_state_dict_into_fresh_module(rng, device, quant_storage, compress_statistics):
    layer = quantized_linear(rng, 64, 48, device, quant_type="nf4", compress_statistics=compress_statistics,
                             quant_storage=quant_storage)  # fmt: skip
    state = layer.state_dict()
    assert state["weight"].shape == (64 * 48 // 2 // quant_storage.itemsize, 1)
    assert state["weight"].dtype == quant_storage

    fresh = Linear4bit(64, 48, quant_type="nf4", compress_statistics=compress_statistics,
                       quant_storage=quant_storage, device=device)  # fmt: skip
    result = fresh.load_state_dict(state)  # strict: no missing or unexpected keys
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.weight.bnb_quantized and fresh.weight.module is fresh and fresh.quant_state is fresh.weight.quant_state
    assert fresh.weight.data_ptr() != state["weight"].data_ptr()  # a copy, not an alias
    assert_same_state(fresh.state_dict(), state)
    x = torch.randn(3, 64, generator=rng).to(device)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_load_state_dict_reports_missing_and_unexpected_keys(rng):
    state = quantized_linear(rng, 32, 16, "cpu").state_dict()
    del state["bias"]
    state["extra"] = torch.zeros(1)
    result = Linear4bit(32, 16).load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]


def test_load_state_dict_in_a_model_with_prefixes(rng):
    model = torch.nn.Sequential(Linear4bit(32, 16, quant_type="nf4"), torch.nn.ReLU(), Linear4bit(16, 8)).cpu()
    fresh = torch.nn.Sequential(Linear4bit(32, 16, quant_type="nf4"), torch.nn.ReLU(), Linear4bit(16, 8))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 32, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_load_into_meta_module_takes_the_tensors_device(rng):
    state = quantized_linear(rng, 32, 16, "cpu", quant_type="nf4").state_dict()
    with torch.device("meta"):
        fresh = Linear4bit(32, 16, quant_type="nf4")
    fresh.load_state_dict(state, assign=True)
    assert fresh.weight.device.type == "cpu" and fresh.weight.quant_state.absmax.device.type == "cpu"


def test_from_prequantized(rng, device):
    layer = quantized_linear(rng, 64, 32, device, quant_type="fp4")
    state = layer.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    param = Params4bit.from_prequantized(state["weight"], stats, device=device)
    assert param.bnb_quantized and not param.requires_grad
    assert param.quant_state == layer.weight.quant_state
    assert param.quant_type == "fp4" and param.blocksize == 64 and param.compress_statistics
    assert param.quant_storage == torch.uint8
    # FSDP resolves state-dict keys by getattr on the parameter
    assert torch.equal(param.absmax, layer.weight.quant_state.absmax)
    assert torch.equal(param.nested_absmax, layer.weight.quant_state.state2.absmax)


def test_module_keeps_quant_state_when_a_wrapper_replaces_the_weight(rng):
    layer = quantized_linear(rng, 32, 16, "cpu", compute_dtype=torch.float32)
    x = torch.randn(2, 32, generator=rng)
    with torch.no_grad():
        expected = layer(x)
        layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # what FSDP does
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert isinstance(layer.weight, Params4bit)


# ---------------------------------------------------------------------------------------------
# against the real bitsandbytes (its CPU backend)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
def test_bitsandbytes_state_dict_loads_here_and_back(rng, bnb_ref, quant_type, compress_statistics, quant_storage):
    dense = dense_linear(rng, 64, 48)
    kwargs = dict(quant_type=quant_type, compress_statistics=compress_statistics, quant_storage=quant_storage)
    theirs = bnb_ref.nn.Linear4bit(64, 48, **kwargs)
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")
    x = torch.randn(5, 64, generator=rng)

    # bitsandbytes -> tritonbits: a fresh module, plain load_state_dict
    ours = Linear4bit(64, 48, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)  # same decode, float32 matmul

    # tritonbits -> bitsandbytes, through bitsandbytes' loading path (Params4bit.from_prequantized)
    ours = Linear4bit(64, 48, **kwargs)
    ours.load_state_dict(dense.state_dict())
    ours = ours.cpu()
    state = ours.state_dict()
    if quant_type == "nf4":
        # byte for byte; fp4 may differ in the sign of zero codes (both decode to 0.0)
        assert_same_state(state, theirs.state_dict())
    back = bnb_ref.nn.Linear4bit(64, 48, **kwargs)
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    back.weight = bnb_ref.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=back)
    back.bias = torch.nn.Parameter(state["bias"].clone())
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# copies and moves keep the packed bytes and the QuantState exact


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "how", ["deepcopy", "pickle", "torch_save", "to_same_device", "cpu", "module_to_dtype", "param_to_dtype"]
)
def test_round_trips_keep_weight_exact(rng, quant_storage, how):
    # no bias: Module.to(dtype) rightly casts a float bias; only the weight is under test here
    layer = quantized_linear(rng, 64, 32, "cpu", bias=False, quant_type="nf4", quant_storage=quant_storage,
                             compute_dtype=torch.float32)  # fmt: skip
    before = state_dict_packed(layer)
    x = torch.randn(3, 64, generator=rng)
    with torch.no_grad():
        expected = layer(x)
    if how == "deepcopy":
        other = copy.deepcopy(layer)
        assert other.weight.module is other and other.weight.quant_state is not layer.weight.quant_state
        assert other.weight.data_ptr() != layer.weight.data_ptr()
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(layer))
        assert other.weight.module is other
    elif how == "torch_save":
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    elif how == "to_same_device":
        other = layer.to("cpu")
    elif how == "cpu":
        other = layer.cpu()
    elif how == "module_to_dtype":
        other = layer.to(torch.float16)  # float storage words are cast by nn.Module unless refused
    else:
        other = layer
        other.weight = layer.weight.to(torch.float16)
    assert isinstance(other.weight, Params4bit) and other.weight.bnb_quantized
    assert other.weight.dtype == quant_storage
    assert other.weight.quant_state == layer.weight.quant_state
    assert_same_state(state_dict_packed(other), before)
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_params4bit_alone_deepcopy_and_pickle(rng):
    weight = quantized_linear(rng, 32, 16, "cpu").weight
    for other in (copy.deepcopy(weight), pickle.loads(pickle.dumps(weight)), copy.copy(weight)):
        assert isinstance(other, Params4bit) and torch.equal(other.data, weight.data)
        assert other.quant_state == weight.quant_state and other.quant_type == weight.quant_type
        assert other.blocksize == weight.blocksize and other.bnb_quantized
    assert copy.deepcopy(weight).module is None  # a weight copied alone belongs to no module


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_cpu_round_trip_keeps_weight_exact(rng):
    layer = quantized_linear(rng, 64, 32, "cuda", quant_type="nf4", compute_dtype=torch.float32)
    before = state_dict_packed(layer)
    x = torch.randn(3, 64, generator=rng)
    with torch.no_grad():
        expected = layer(x.cuda()).cpu()
        layer = layer.cpu()
        assert layer.weight.device.type == "cpu" and layer.weight.quant_state.absmax.device.type == "cpu"
        cpu_out = layer(x)
        layer = layer.cuda()
        assert layer.weight.quant_state.device.type == "cuda"
        assert_same_state(state_dict_packed(layer), before)
        torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(cpu_out, expected, rtol=1e-5, atol=1e-5)  # other device, other kernels


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    # every case compiles a new layer through the same forward code: start from an empty cache
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch_shape", [(1,), (2, 3)], ids=["1row", "2x3"])
def test_compile_fullgraph_matches_eager(rng, fresh_dynamo, compute_dtype, batch_shape):
    # aot_eager: Dynamo + AOTAutograd tracing (graph breaks, fake impls, autograd) without codegen
    layer = quantized_linear(rng, 64, 32, "cpu", quant_type="nf4", compute_dtype=compute_dtype)
    layer.bias.requires_grad_(True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(*batch_shape, 64, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x_eager).square().sum().backward()
    bias_grad = layer.bias.grad.clone()
    layer.bias.grad = None
    compiled(x_compiled).square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, bias_grad, rtol=0, atol=0)


def test_compile_fullgraph_inductor(rng, fresh_dynamo, device):
    layer = quantized_linear(rng, 64, 32, device, quant_type="nf4", compute_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 64, generator=rng).to(device)
    with torch.no_grad():
        # inductor may fuse/reorder the float32 reductions: within float32 rounding of eager
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_tritonbits_exposes_layers_and_matmul_4bit():
    assert bnb.nn.Linear4bit is Linear4bit and bnb.nn.Params4bit is Params4bit
    assert callable(bnb.matmul_4bit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Linear4bit(64, 32)  # building warns about nothing


def _state_tensors(state):
    return [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]


def test_cpu_quant_state_is_not_marked_for_compile(rng):
    layer = Linear4bit(64, 32, compress_statistics=True).cpu()
    layer.weight.quantize_()
    assert not any(hasattr(t, "_dynamo_static_input_type") for t in _state_tensors(layer.weight.quant_state))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quant_state_is_static_under_compile(rng):
    """CUDA graphs of a compiled model must not copy the quant state into their inputs on every
    replay: its tensors are static addresses, as parameters are, also after moving back and forth."""
    layer = Linear4bit(64, 32, compress_statistics=True).cuda()
    for _ in range(2):
        tensors = _state_tensors(layer.weight.quant_state)
        assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in tensors)
        layer = layer.cpu().cuda()
