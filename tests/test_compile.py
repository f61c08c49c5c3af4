"""Every op traces under torch.compile(fullgraph=True): fake impls match the real outputs."""

import pytest
import torch

import tritonbits.functional as F

# aot_eager runs the fake (meta) impls and the real kernels through AOTAutograd without paying for
# Inductor code generation on CPU; one case below also goes through Inductor.
BACKEND = "aot_eager"


def compiled(fn, backend=BACKEND):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_round_trip(rng, quant_type):
    x = torch.randn(40, 64, generator=rng).to(torch.bfloat16)

    def round_trip(t):
        packed, absmax = torch.ops.tritonbits.quantize_4bit(t, 64, quant_type, torch.uint8)
        return torch.ops.tritonbits.dequantize_4bit(packed, absmax, 64, quant_type, list(t.shape), t.dtype)

    assert torch.equal(compiled(round_trip)(x), round_trip(x))


def test_blockwise_round_trip(rng):
    x = torch.randn(1000, generator=rng)
    code = F.create_dynamic_map()

    def round_trip(t):
        q, absmax = torch.ops.tritonbits.quantize_blockwise(t, code, 256)
        return torch.ops.tritonbits.dequantize_blockwise(q, absmax, code, 256, torch.float16)

    assert torch.equal(compiled(round_trip)(x), round_trip(x))


def test_gemv_and_functional_dequantize(rng):
    w = torch.randn(32, 64, generator=rng)
    packed, state = F.quantize_4bit(w, quant_type="nf4")
    a = torch.randn(1, 64, generator=rng)

    def layer(inp):
        return F.gemv_4bit(inp, packed.t(), state=state) + F.dequantize_4bit(packed, state).sum()

    assert torch.allclose(compiled(layer)(a), layer(a))


def test_int8_ops(rng):
    x = torch.randn(16, 64, generator=rng).half()
    w = torch.randn(32, 64, generator=rng).half()

    def int8_linear(inp):
        qa, sa, _ = torch.ops.tritonbits.int8_vectorwise_quant(inp, 0.0)
        qw, sw, _ = torch.ops.tritonbits.int8_vectorwise_quant(w, 0.0)
        return torch.ops.tritonbits.int8_scaled_mm(qa, qw, sa, sw, None, torch.float16)

    assert torch.equal(compiled(int8_linear)(x), int8_linear(x))


def test_int8_outlier_columns_are_dynamic(rng):
    x = torch.randn(16, 64, generator=rng)
    x[3, 7] = 9.0

    def quant(inp):
        q, s, cols = torch.ops.tritonbits.int8_vectorwise_quant(inp, 6.0)
        return q, s, cols

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        got = compiled(quant)(x)
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False
    for a, b in zip(got, quant(x)):
        assert torch.equal(a, b)


def test_inductor_4bit(rng):
    x = torch.randn(8, 64, generator=rng)

    def round_trip(t):
        packed, absmax = torch.ops.tritonbits.quantize_4bit(t, 64, "nf4", torch.uint8)
        return torch.ops.tritonbits.dequantize_4bit(packed, absmax, 64, "nf4", [8, 64], torch.float32) * 2

    assert torch.equal(compiled(round_trip, backend="inductor")(x), round_trip(x))


def test_opcheck(rng):
    # torch.library.opcheck: schema, fake impl and autograd registration are consistent.
    x = torch.randn(4, 64, generator=rng)
    packed, absmax = torch.ops.tritonbits.quantize_4bit(x, 64, "nf4", torch.uint8)
    code = F.create_dynamic_map()
    cb, scb, _ = F.int8_vectorwise_quant(torch.randn(8, 64, generator=rng))
    cases = [
        (torch.ops.tritonbits.quantize_4bit.default, (x, 64, "nf4", torch.uint8)),
        (torch.ops.tritonbits.dequantize_4bit.default, (packed, absmax, 64, "nf4", [4, 64], torch.float16)),
        (torch.ops.tritonbits.quantize_blockwise.default, (x, code, 64)),
        (torch.ops.tritonbits.int8_vectorwise_quant.default, (x, 0.0)),
        (torch.ops.tritonbits.int8_mixed_linear.default, (x * 4, cb, scb, None, 0.0)),
        (torch.ops.tritonbits.int8_mixed_linear.default, (x * 4, cb, scb, torch.randn(8, generator=rng), 6.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_linear8bitlt_compiles_without_graph_breaks(rng, threshold):
    """LLM.int8() with outlier columns traces as one graph: the op returns outlier flags of static
    shape, and ``state.idx`` is derived from them when read (no data-dependent shapes, no sync)."""
    import tritonbits as bnb

    dense = torch.nn.Linear(64, 32).half()
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(dense.state_dict())
    layer = layer.cpu().eval()
    x = torch.randn(4, 64, generator=rng).half()
    x[:, 5] *= 10  # column 5 crosses the threshold
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(compiled(layer)(x), expected)
    if threshold:
        columns = torch.argwhere((x.abs() >= threshold).any(dim=0)).view(-1)
        assert 5 in columns.tolist() and torch.equal(layer.state.idx, columns)
    # with the input's gradient (LoRA on a frozen 8-bit base): through the autograd Function
    x_grad = x.clone().requires_grad_(True)
    out = compiled(layer)(x_grad)
    assert torch.equal(out.detach(), expected)
    out.float().sum().backward()
    reference = x.clone().requires_grad_(True)
    layer(reference).float().sum().backward()
    assert torch.equal(x_grad.grad, reference.grad)
