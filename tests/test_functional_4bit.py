"""functional 4-bit API: bitsandbytes compatibility (bytes, absmax, state), sizes, errors."""

import pickle

import pytest
import torch

import tritonbits.functional as F
from support import assert_same_decoding
from tritonbits.backends.torch.quant_4bit import FP4_MAGNITUDE_THRESHOLDS, NF4_THRESHOLDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (63,), (37, 331), (2, 3, 4096)]


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n]


def on_bnb_cpu_boundary(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Where bitsandbytes' CPU path (float32 midpoints) may legitimately differ from its CUDA
    kernels' constants, which we follow: within 4e-7 of a threshold, or FP4's +-0 for tiny values."""
    table = F.get_4bit_type(quant_type)
    if quant_type == "nf4":
        near = (scaled[:, None] - torch.tensor(NF4_THRESHOLDS)[None, :]).abs().min(1).values < 4e-7
        return near
    t = torch.tensor(FP4_MAGNITUDE_THRESHOLDS)
    near = (scaled.abs()[:, None] - t[None, :]).abs().min(1).values < 4e-7
    return near | (scaled.abs() <= t[0]) | (table.numel() == 0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes(bnb_ref, rng, quant_type, dtype, blocksize, shape):
    x = (torch.randn(shape, generator=rng) * 3).to(dtype)
    ours, our_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    theirs, their_state = bnb_ref.functional.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(our_state.absmax, their_state.absmax), "absmax: same float32 values"
    n = x.numel()
    differ = codes_of(ours, n) != codes_of(theirs, n)
    scaled = x.reshape(-1).float() * (1.0 / our_state.absmax).repeat_interleave(blocksize)[:n]
    assert not torch.any(differ & ~on_bnb_cpu_boundary(scaled, quant_type)), "codes equal off the boundaries"
    # Each library decodes the other's bytes to the same values as its own decoder does.
    ours_decoded = F.dequantize_4bit(ours, our_state)
    assert ours_decoded.shape == x.shape and ours_decoded.dtype == dtype
    assert_same_decoding(bnb_ref.functional.dequantize_4bit(ours, their_state), ours_decoded)
    assert_same_decoding(F.dequantize_4bit(theirs, our_state), bnb_ref.functional.dequantize_4bit(theirs, their_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_nested_and_storage_match_bitsandbytes(bnb_ref, rng, quant_type, quant_storage):
    x = torch.randn(64, 256, generator=rng).to(torch.bfloat16)
    kw = dict(blocksize=64, quant_type=quant_type, compress_statistics=True, quant_storage=quant_storage)
    ours, s1 = F.quantize_4bit(x, **kw)
    theirs, s2 = bnb_ref.functional.quantize_4bit(x, **kw)
    assert ours.dtype == theirs.dtype == quant_storage and ours.shape == theirs.shape
    assert s1.nested and s2.nested
    assert torch.equal(s1.offset, s2.offset)
    assert torch.equal(s1.state2.absmax, s2.state2.absmax)
    assert s1.state2.blocksize == s2.state2.blocksize == 256
    # Nested absmax codes: 8-bit blockwise codes of absmax - offset. bitsandbytes' CPU quantizer
    # is approximate (a lookup table), so where the codes differ ours must be the nearer one.
    scales = (s1.state2.absmax.repeat_interleave(256)[: s1.absmax.numel()])
    true_absmax = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)[1].absmax
    target = (true_absmax - s1.offset) / scales
    code = s1.state2.code
    ours_err = (code[s1.absmax.long()] - target).abs()
    theirs_err = (code[s2.absmax.long()] - target).abs()
    assert torch.all(ours_err <= theirs_err + 1e-6)
    assert_same_decoding(bnb_ref.functional.dequantize_4bit(ours, s2), F.dequantize_4bit(ours, s2))
    decoded = F.dequantize_4bit(ours, s1)
    rel = (decoded.float() - x.float()).norm() / x.float().norm()
    assert rel < 0.13, f"relative error {rel:.3f}; ~0.09 (nf4) / ~0.11 (fp4) expected"


@pytest.mark.parametrize("packed", [False, True])
def test_quant_state_dicts_interchange(bnb_ref, rng, packed):
    x = torch.randn(96, 64, generator=rng).half()
    _, ours = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    _, theirs = bnb_ref.functional.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    our_dict, their_dict = ours.as_dict(packed=packed), theirs.as_dict(packed=packed)
    assert sorted(our_dict) == sorted(their_dict)
    if packed:
        key = "quant_state.bitsandbytes__nf4"
        assert bytes(our_dict[key].tolist()) == bytes(their_dict[key].tolist()), "same JSON bytes"
    rebuilt_by_us = F.QuantState.from_dict(their_dict, device="cpu")
    rebuilt_by_them = bnb_ref.functional.QuantState.from_dict(our_dict, device="cpu")
    assert rebuilt_by_us.shape == theirs.shape and rebuilt_by_us.dtype == torch.float16
    assert torch.equal(rebuilt_by_us.absmax, theirs.absmax) and torch.equal(rebuilt_by_them.absmax, ours.absmax)
    assert rebuilt_by_them.nested and float(rebuilt_by_them.offset) == float(ours.offset)


def test_quant_state_round_trip_and_copy(rng):
    x = torch.randn(50, 40, generator=rng)
    packed, state = F.quantize_4bit(x, quant_type="fp4", compress_statistics=True)
    for copy in (
        F.QuantState.from_dict(state.as_dict(packed=True), "cpu"),
        F.QuantState.from_dict(state.as_dict(packed=False), "cpu"),
        pickle.loads(pickle.dumps(state)),
    ):
        assert copy == state
        assert torch.equal(F.dequantize_4bit(packed, copy), F.dequantize_4bit(packed, state))
    other = F.quantize_4bit(x * 2, quant_type="fp4", compress_statistics=True)[1]
    assert other != state
    assert state.to("cpu") is state and state.device == torch.device("cpu")
    assert state[0] is state.absmax and state[3] == 64 and state[5] == "fp4"
    assert isinstance(state.bitsandbytes__fp4, torch.Tensor)
    with pytest.raises(AttributeError):
        state.no_such_field


def test_from_dict_rejects_bad_input():
    with pytest.raises(ValueError, match="found neither"):
        F.QuantState.from_dict({"absmax": torch.ones(1)}, "cpu")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_edge_sizes(rng, quant_type):
    for shape in [(0,), (0, 7), (1,), (3,), (1, 1)]:
        x = torch.randn(shape, generator=rng)
        packed, state = F.quantize_4bit(x, quant_type=quant_type)
        n = x.numel()
        assert packed.shape == ((n + 1) // 2, 1)
        back = F.dequantize_4bit(packed, state)
        assert back.shape == x.shape
        if n:
            assert torch.allclose(back, x, atol=x.abs().max().item() * 0.1 + 1e-6) or n > 1


def test_non_contiguous(rng):
    x = torch.randn(128, 64, generator=rng)[:, ::2]
    assert not x.is_contiguous()
    a, sa = F.quantize_nf4(x)
    b, sb = F.quantize_nf4(x.contiguous())
    assert torch.equal(a, b) and sa == sb
    assert torch.equal(F.dequantize_nf4(a, sa), F.dequantize_nf4(b, sb))


def test_defaults_match_bitsandbytes(rng):
    x = torch.randn(256, generator=rng)
    _, state = F.quantize_4bit(x)
    assert state.quant_type == "fp4" and state.blocksize == 64 and not state.nested
    _, state = F.quantize_nf4(x)
    assert state.quant_type == "nf4"


def test_out_and_absmax_arguments(rng):
    x = torch.randn(256, generator=rng)
    out = torch.empty(128, 1, dtype=torch.uint8)
    absmax = torch.empty(4)
    packed, state = F.quantize_4bit(x, absmax=absmax, out=out, quant_type="nf4")
    assert packed is out and state.absmax is absmax
    decoded = torch.empty(256)
    result = F.dequantize_4bit(packed, absmax=absmax, out=decoded, quant_type="nf4")
    assert result is decoded and torch.equal(decoded, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_4bit(rng, dtype):
    w = torch.randn(48, 128, generator=rng).to(dtype)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    a = torch.randn(2, 1, 128, generator=rng).to(dtype)
    out = F.gemv_4bit(a, packed.t(), state=state)
    expected = torch.nn.functional.linear(a, F.dequantize_4bit(packed, state))
    assert out.shape == (2, 1, 48) and out.dtype == dtype
    assert torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2)  # same math, dtype rounding


class TestErrors:
    def test_dtype(self):
        with pytest.raises(ValueError, match="A must be float16, bfloat16 or float32, got torch.int32"):
            F.quantize_4bit(torch.ones(64, dtype=torch.int32))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="A must be a torch.Tensor"):
            F.quantize_4bit([1.0, 2.0])

    @pytest.mark.parametrize("blocksize", [16, 48, 8192, 0])
    def test_blocksize(self, blocksize):
        with pytest.raises(ValueError, match="blocksize"):
            F.quantize_4bit(torch.ones(64), blocksize=blocksize)

    def test_blocksize_type(self):
        with pytest.raises(TypeError, match="blocksize must be an int"):
            F.quantize_4bit(torch.ones(64), blocksize=64.0)

    def test_quant_type(self):
        with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
            F.quantize_4bit(torch.ones(64), quant_type="int4")

    def test_quant_storage_size(self):
        with pytest.raises(ValueError, match="multiple of 4"):
            F.quantize_4bit(torch.ones(66), quant_storage=torch.float16)
        with pytest.raises(ValueError, match="quant_storage"):
            F.quantize_4bit(torch.ones(64), quant_storage=torch.int32)

    def test_state_mismatch(self):
        packed, state = F.quantize_4bit(torch.randn(128))
        state.absmax = state.absmax[:1]
        with pytest.raises(ValueError, match="absmax has 1 entries"):
            F.dequantize_4bit(packed, state)

    def test_too_few_bytes(self):
        packed, state = F.quantize_4bit(torch.randn(128))
        with pytest.raises(ValueError, match="too few"):
            F.dequantize_4bit(packed[:10], state)

    def test_device_mismatch(self):
        packed, state = F.quantize_4bit(torch.randn(128))
        state.absmax = state.absmax.to("meta")
        with pytest.raises(ValueError, match="one device"):
            F.dequantize_4bit(packed, state)

    def test_missing_state(self):
        with pytest.raises(ValueError, match="requires both absmax and out"):
            F.dequantize_4bit(torch.zeros(4, 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match="state cannot be None"):
            F.gemv_4bit(torch.randn(1, 8), torch.zeros(4, 1, dtype=torch.uint8))

    def test_gemv_shape(self):
        packed, state = F.quantize_4bit(torch.randn(16, 64))
        with pytest.raises(ValueError, match="must equal the weight's K"):
            F.gemv_4bit(torch.randn(1, 32), packed, state=state)


def test_states_do_not_share_their_code_table(rng):
    # safetensors refuses a state dict whose tensors share storage, so each state owns its table.
    _, first = F.quantize_4bit(torch.randn(64, generator=rng), quant_type="nf4")
    _, second = F.quantize_4bit(torch.randn(64, generator=rng), quant_type="nf4")
    assert first.code.untyped_storage().data_ptr() != second.code.untyped_storage().data_ptr()
