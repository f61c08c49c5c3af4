"""functional 8-bit blockwise API: bitsandbytes compatibility, nesting, sizes, errors."""

import pytest
import torch

import tritonbits.functional as F
from support import assert_same_decoding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_ours_nearest_where_codes_differ(x, ours, theirs, state):
    """bitsandbytes' CPU quantizer is approximate (a lookup table) and picks a non-nearest code for
    a few values; wherever the codes differ, ours must be at least as near (float64, 1e-7 slack)."""
    n = x.numel()
    scaled = x.reshape(-1).double() / state.absmax.double().repeat_interleave(state.blocksize)[:n]
    code = state.code.double()
    ours_err = (code[ours.reshape(-1).long()] - scaled).abs()
    theirs_err = (code[theirs.reshape(-1).long()] - scaled).abs()
    assert torch.all(ours_err <= theirs_err + 1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("shape", [(1,), (100,), (33, 257)])
def test_matches_bitsandbytes(bnb_ref, rng, dtype, blocksize, shape):
    x = (torch.randn(shape, generator=rng) * 2).to(dtype)
    ours, s1 = F.quantize_blockwise(x, blocksize=blocksize)
    theirs, s2 = bnb_ref.functional.quantize_blockwise(x, blocksize=blocksize)
    assert ours.shape == theirs.shape == x.shape and ours.dtype == torch.uint8
    assert torch.equal(s1.absmax, s2.absmax) and torch.equal(s1.code, s2.code)
    assert s1.blocksize == s2.blocksize and s1.dtype == s2.dtype == dtype
    assert_ours_nearest_where_codes_differ(x, ours, theirs, s1)
    ours_decoded = F.dequantize_blockwise(ours, s1)
    assert ours_decoded.dtype == dtype and ours_decoded.shape == x.shape
    assert_same_decoding(bnb_ref.functional.dequantize_blockwise(ours, s2), ours_decoded)
    assert_same_decoding(F.dequantize_blockwise(theirs, s1), bnb_ref.functional.dequantize_blockwise(theirs, s2))


def test_nested_matches_bitsandbytes(bnb_ref, rng):
    x = torch.randn(256 * 300, generator=rng)
    ours, s1 = F.quantize_blockwise(x, blocksize=256, nested=True)
    theirs, s2 = bnb_ref.functional.quantize_blockwise(x, blocksize=256, nested=True)
    assert s1.nested and s2.nested and torch.equal(s1.offset, s2.offset)
    assert torch.equal(s1.state2.absmax, s2.state2.absmax)
    decoded = F.dequantize_blockwise(ours, s1)
    assert torch.equal(decoded, bnb_ref.functional.dequantize_blockwise(ours, s1))
    rel = (decoded - x).norm() / x.norm()
    assert rel < 0.02, f"8-bit dynamic relative error {rel:.4f}"


@pytest.mark.parametrize("blocksize", [1, 7, 100, 5000])
def test_any_positive_blocksize(rng, blocksize):
    x = torch.randn(777, generator=rng)
    q, state = F.quantize_blockwise(x, blocksize=blocksize)
    assert state.absmax.numel() == -(777 // -blocksize)
    rel = (F.dequantize_blockwise(q, state) - x).norm() / x.norm()
    assert rel < 0.03


def test_custom_code_and_absmax_only_decode(rng):
    code = F.create_linear_map(signed=True)
    x = torch.randn(4096, generator=rng)
    q, state = F.quantize_blockwise(x, code=code, blocksize=512)
    # Decoding from absmax + code alone gives float32.
    decoded = F.dequantize_blockwise(q, absmax=state.absmax, code=code, blocksize=512)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, F.dequantize_blockwise(q, state))


def test_out_arguments(rng):
    x = torch.randn(4096, generator=rng).half()
    out = torch.empty(4096, dtype=torch.uint8)
    absmax = torch.empty(1)
    q, state = F.quantize_blockwise(x, out=out, absmax=absmax)
    assert q is out and state.absmax is absmax
    dest = torch.empty(4096, dtype=torch.float16)
    assert F.dequantize_blockwise(q, state, out=dest) is dest


def test_empty_and_non_contiguous(rng):
    q, state = F.quantize_blockwise(torch.empty(0, 3))
    assert q.shape == (0, 3) and F.dequantize_blockwise(q, state).shape == (0, 3)
    x = torch.randn(100, 80, generator=rng).t()
    a, sa = F.quantize_blockwise(x, blocksize=64)
    b, sb = F.quantize_blockwise(x.contiguous(), blocksize=64)
    assert torch.equal(a, b) and sa == sb


class TestErrors:
    def test_dtype(self):
        with pytest.raises(ValueError, match="A must be float16, bfloat16 or float32, got torch.float64"):
            F.quantize_blockwise(torch.ones(8, dtype=torch.float64))
        with pytest.raises(ValueError, match="A must be uint8"):
            F.dequantize_blockwise(torch.ones(8), absmax=torch.ones(1))

    @pytest.mark.parametrize("blocksize", [0, -64])
    def test_blocksize(self, blocksize):
        with pytest.raises(ValueError, match="blocksize must be positive"):
            F.quantize_blockwise(torch.ones(8), blocksize=blocksize)

    def test_code_size(self):
        with pytest.raises(ValueError, match="code must have 256 entries"):
            F.quantize_blockwise(torch.ones(8), code=torch.linspace(-1, 1, 16))

    def test_missing_state(self):
        with pytest.raises(ValueError, match="either quant_state or absmax"):
            F.dequantize_blockwise(torch.zeros(8, dtype=torch.uint8))

    def test_absmax_count(self):
        q, state = F.quantize_blockwise(torch.randn(1000), blocksize=64)
        with pytest.raises(ValueError, match="absmax has 15 entries"):
            F.dequantize_blockwise(q, absmax=state.absmax[:15], blocksize=64)

    def test_out_shape(self):
        q, state = F.quantize_blockwise(torch.randn(64))
        with pytest.raises(ValueError, match="out must have shape"):
            F.dequantize_blockwise(q, state, out=torch.empty(63))


def test_op_sees_the_same_code_tensor_on_every_call_and_the_state_keeps_a_copy(monkeypatch):
    """Kernels keep their search tables per code tensor: each call with the default code (or with
    one caller's code) must hand the op that same tensor, never a fresh copy; the QuantState must
    still own its code, so that changing it leaves later calls alone."""
    import tritonbits.functional as functional

    seen = []
    real_call = functional._call

    def recording_call(name, *args, **kwargs):
        if name == "quantize_blockwise":
            seen.append(args[1])
        return real_call(name, *args, **kwargs)

    monkeypatch.setattr(functional, "_call", recording_call)
    A = torch.randn(1000)
    _, s1 = functional.quantize_blockwise(A, blocksize=256)
    _, s2 = functional.quantize_blockwise(A, blocksize=256)
    assert seen[0] is seen[1]
    assert s1.code is not seen[0] and s2.code is not s1.code and torch.equal(s1.code, seen[0])
    s1.code.zero_()  # the caller owns the state's copy
    codes3, s3 = functional.quantize_blockwise(A, blocksize=256)
    assert torch.equal(s3.code, s2.code) and torch.equal(codes3, functional.quantize_blockwise(A, blocksize=256)[0])

    mine = functional.create_dynamic_map(signed=False).float()
    seen.clear()
    functional.quantize_blockwise(A.abs(), code=mine, blocksize=256)
    _, state = functional.quantize_blockwise(A.abs(), code=mine, blocksize=256)
    assert seen[0] is mine and seen[1] is mine
    assert state.code is not mine and torch.equal(state.code, mine)
