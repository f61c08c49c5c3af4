"""Triton NF4/FP4 kernels against the PyTorch reference: packed bytes and absmax bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tritonbits.functional as F
from tritonbits._ops import BLOCKSIZES_4BIT, QUANT_STORAGE_DTYPES
from tritonbits.backends.torch.quant_4bit import _thresholds

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]
SHAPES = [(1,), (777,), (33, 65)]  # one element, odd, 2-D with a partial last block


def _random(shape, dtype, rng, device, scale=3.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


def _check_roundtrip(launcher, reference, A, blocksize, quant_type, quant_storage=torch.uint8):
    packed, absmax = launcher("quantize_4bit")(A, blocksize, quant_type, quant_storage)
    ref_packed, ref_absmax = reference("quantize_4bit")(A, blocksize, quant_type, quant_storage)
    assert packed.dtype == quant_storage and packed.shape == ref_packed.shape
    assert torch.equal(absmax, ref_absmax)  # exact: max |x| is order-independent
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))  # exact bytes

    shape, dtype = list(A.shape), A.dtype
    out = launcher("dequantize_4bit")(packed, absmax, blocksize, quant_type, shape, dtype)
    expected = reference("dequantize_4bit")(packed, absmax, blocksize, quant_type, shape, dtype)
    assert out.shape == A.shape and out.dtype == dtype
    assert torch.equal(out, expected)  # exact: float32 product, round-to-nearest-even cast
    return packed, absmax


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matches_reference(launcher, reference, rng, device, quant_type, dtype, blocksize, shape):
    _check_roundtrip(launcher, reference, _random(shape, dtype, rng, device), blocksize, quant_type)


@pytest.mark.parametrize("quant_storage", QUANT_STORAGE_DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_every_quant_storage(launcher, reference, rng, device, quant_type, quant_storage):
    A = _random((24, 40), torch.bfloat16, rng, device)  # 960 elements: whole words of any storage
    packed, _ = _check_roundtrip(launcher, reference, A, 64, quant_type, quant_storage)
    assert packed.shape == (960 // (2 * quant_storage.itemsize), 1)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_partial_last_word_is_dropped(launcher, reference, rng, device, quant_type):
    # 1001 codes in float32 words (8 codes each): 125 whole words are kept, the rest dropped.
    A = _random((1001,), torch.float32, rng, device)
    packed, absmax = launcher("quantize_4bit")(A, 64, quant_type, torch.float32)
    ref_packed, ref_absmax = reference("quantize_4bit")(A, 64, quant_type, torch.float32)
    assert packed.shape == (125, 1)
    assert torch.equal(absmax, ref_absmax) and torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_values_on_thresholds_zero_and_signed_zero(launcher, reference, rng, device, quant_type):
    thresholds = _thresholds(quant_type).to(device)
    tiny = torch.tensor([1e-30, -1e-30, 0.0, -0.0], device=device)
    A = torch.cat([torch.ones(1, device=device), thresholds, -thresholds, tiny])  # absmax exactly 1
    A = torch.cat([A, torch.zeros(64, device=device)])  # and an all-zero block
    _check_roundtrip(launcher, reference, A, 32, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bucket_table_reproduces_the_reference_encoder(rng, quant_type):
    """The kernel's code choice, emulated in torch on its table: floor(32 x / absmax) picks the
    entry, one compare with its threshold picks the code. Checked on every float32 within 64
    ulps of each threshold (and its negation), at bucket edges, signed zeros, subnormals,
    values just past +-1 and on random values, against the reference encoder."""
    from tritonbits.backends.torch.quant_4bit import encode_4bit
    from tritonbits.backends.triton.quant_4bit import _bucket_entries

    entries = _bucket_entries(quant_type)
    marks = torch.cat([_thresholds(quant_type), -_thresholds(quant_type), torch.arange(-33, 34) / 32.0])
    steps = torch.arange(-64, 65, dtype=torch.int32)
    near = (marks.view(torch.int32)[:, None] + steps[None, :]).reshape(-1).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0, -1.0])
    past_one = (torch.tensor([1.0, -1.0]).view(torch.int32)[:, None] + torch.arange(0, 4)).reshape(-1).view(torch.float32)
    scaled = torch.cat([near, special, past_one, torch.rand(200_000, generator=rng) * 2 - 1])
    scaled = scaled[scaled.abs() <= 1.0000002]  # x * (1 / absmax): within 2 ulps of +-1 at most
    value = scaled * 32.0
    entry = entries[torch.floor(value).long() + 33]
    threshold = (entry & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    shift = torch.where(value > threshold, 40, 32)
    codes = (entry >> shift) & 15
    assert torch.equal(codes, encode_4bit(scaled, quant_type).long())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_global_memory_table_variant(launcher, reference, rng, device, monkeypatch, quant_type):
    from tritonbits.backends.triton import quant_4bit as kernels

    monkeypatch.setattr(kernels, "_SHARED_TABLE", not kernels._SHARED_TABLE)
    _check_roundtrip(launcher, reference, _random((40, 96), torch.bfloat16, rng, device), 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_split_table_variant(launcher, reference, rng, device, monkeypatch, quant_type):
    """Thresholds and code pairs gathered from two shared-memory tables: the same bytes, also on
    the thresholds themselves, signed zeros and an all-zero block."""
    from tritonbits.backends.triton import quant_4bit as kernels

    monkeypatch.setattr(kernels, "_SHARED_TABLE", True)
    monkeypatch.setattr(kernels, "_SPLIT_TABLE", True)
    _check_roundtrip(launcher, reference, _random((40, 96), torch.bfloat16, rng, device), 64, quant_type)
    thresholds = _thresholds(quant_type).to(device)
    tiny = torch.tensor([1e-30, -1e-30, 0.0, -0.0], device=device)
    A = torch.cat([torch.ones(1, device=device), thresholds, -thresholds, tiny, torch.zeros(64, device=device)])
    _check_roundtrip(launcher, reference, A, 32, quant_type)


@pytest.mark.parametrize("pairs", [False, True], ids=["values", "pairs"])
@pytest.mark.parametrize("shape", [(64, 64), (2, 777), (777,)], ids=["whole_tiles", "even", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_unmasked_and_word_pair_variants(launcher, reference, rng, device, monkeypatch, quant_type, dtype, shape,
                                         pairs):
    """Whole tiles compile without masks (EVEN); with ``_PAIRS`` 16-bit input of an even size is
    read as int32 words of two values (masked at a partial tile), odd sizes and float32 as values."""
    from tritonbits.backends.triton import quant_4bit as kernels

    monkeypatch.setattr(kernels, "_PAIRS", pairs)
    numel = torch.Size(shape).numel()
    for blocksize in (64, 128):
        # A view at the start of a larger buffer whose next values are huge: a read past A shows.
        buffer = torch.full((numel + 64,), 1e4, dtype=dtype, device=device)
        buffer[:numel] = _random((numel,), dtype, rng, device)
        buffer[:numel:blocksize] *= 4  # each block's first value its largest: blocks must not mix
        _check_roundtrip(launcher, reference, buffer[:numel].view(shape), blocksize, quant_type)
    thresholds = _thresholds(quant_type).to(device)
    tiny = torch.tensor([1e-30, -1e-30, 0.0, -0.0], device=device)
    A = torch.cat([torch.ones(1, device=device), thresholds, -thresholds, tiny, torch.zeros(64, device=device)])
    _check_roundtrip(launcher, reference, torch.nn.functional.pad(A, (0, 128 - A.numel())).to(dtype), 32, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(launcher, reference, rng, device, quant_type, dtype):
    A = _random((96, 40), dtype, rng, device).t()[:, ::2]
    assert not A.is_contiguous()
    _check_roundtrip(launcher, reference, A, 128, quant_type)


@pytest.mark.parametrize("shape", [(0,), (4, 0)], ids=str)
def test_empty_input(launcher, device, shape):
    A = torch.empty(shape, dtype=torch.float16, device=device)
    packed, absmax = launcher("quantize_4bit")(A, 64, "nf4", torch.uint8)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    out = launcher("dequantize_4bit")(packed, absmax, 64, "nf4", list(shape), torch.float16)
    assert out.shape == shape and out.dtype == torch.float16


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_random_bytes(launcher, reference, rng, device, quant_type):
    packed = torch.randint(0, 256, (501, 1), generator=rng, dtype=torch.uint8).to(device)
    absmax = (torch.rand(16, generator=rng) * 5 + 0.1).to(device)
    for dtype in DTYPES:
        out = launcher("dequantize_4bit")(packed, absmax, 64, quant_type, [1001], dtype)
        expected = reference("dequantize_4bit")(packed, absmax, 64, quant_type, [1001], dtype)
        assert torch.equal(out, expected)  # exact


@pytest.mark.parametrize("vec, shared", [(0, True), (4, False), (4, True), (8, True)])
@pytest.mark.parametrize("numel", [4096, 1001], ids=["whole_tiles", "partial"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_kernel_options(reference, rng, device, monkeypatch, quant_type, nested, numel, vec, shared):
    """The opt-in dequantize options (runs of VEC bytes a thread, the shared-memory table), on
    whole tiles (no masks) and a partial one, against the PyTorch reference, bit for bit."""
    from tritonbits.backends.triton import quant_4bit as kernels

    monkeypatch.setattr(kernels, "_DEQUANT_VEC", vec)
    monkeypatch.setattr(kernels, "_DEQUANT_SHARED_TABLE", shared)
    w = (torch.randn(numel, generator=rng) * 3).to(device)
    w[::64] *= 4  # each block's first value its largest
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    absmax = state.absmax
    if nested:  # the reference's decode of the 8-bit absmax codes
        inner = state.state2
        absmax = reference("dequantize_blockwise")(absmax, inner.absmax, inner.code, inner.blocksize, torch.float32)
        absmax = absmax + state.offset
    for dtype in DTYPES:
        launch = kernels.DequantLaunch(packed, state.absmax, kernels._device_table(quant_type, packed.device), 64,
                                       [numel], dtype, kernels.nested_absmax_args(state))  # fmt: skip
        assert launch.constexprs["EVEN"] == (numel == 4096) and launch.constexprs["VEC"] == vec
        expected = reference("dequantize_4bit")(packed, absmax, 64, quant_type, [numel], dtype)
        assert torch.equal(launch.launch(), expected)  # exact


_DISPATCH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import tritonbits.functional as F

    g = torch.Generator().manual_seed(0)
    A = (torch.randn(40, 96, generator=g) * 2).to(torch.bfloat16)
    packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    restored = F.dequantize_4bit(packed, state)
    codes, state8 = F.quantize_blockwise(A.float(), blocksize=256, nested=True)
    restored8 = F.dequantize_blockwise(codes, state8)
    q, stats, cols = F.int8_vectorwise_quant(A, threshold=3.0)
    torch.save(
        {"packed": packed, "absmax": state.absmax, "restored": restored, "codes": codes,
         "absmax8": state8.absmax, "restored8": restored8, "q": q, "stats": stats, "cols": cols},
        sys.argv[1],
    )
    print("kernels_loaded", "tritonbits.backends.triton.quant_4bit" in sys.modules,
          "tritonbits.backends.triton.quant_blockwise" in sys.modules, "tritonbits.backends.triton.int8" in sys.modules)
    """
)


def _run_functional(backend: str, path) -> str:
    env = dict(os.environ, TRITONBITS_BACKEND=backend, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", _DISPATCH_SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_backend_selects_triton_kernels_on_cpu_tensors(tmp_path):
    """TRITONBITS_BACKEND=triton + TRITON_INTERPRET=1 routes the functional API (nested states
    included) through the Triton launchers on CPU tensors; =torch never loads them; both agree."""
    triton_out = _run_functional("triton", tmp_path / "triton.pt")
    torch_out = _run_functional("torch", tmp_path / "torch.pt")
    assert "kernels_loaded True True True" in triton_out
    # (torch itself may import the triton package, from torch._dynamo; our kernels must stay unloaded.)
    assert "kernels_loaded False False False" in torch_out
    got, expected = torch.load(tmp_path / "triton.pt"), torch.load(tmp_path / "torch.pt")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # exact: same bits through either backend


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kept_dequantize_launch_is_bit_identical_to_the_functional_api(device, rng, nested, quant_type, blocksize,
                                                                       dtype):  # fmt: skip
    """The launch kept on the state (the nested absmax decoded inside the kernel) gives exactly
    what functional.dequantize_4bit gives, and follows in-place changes of the state."""
    from tritonbits.backends.triton.quant_4bit import state_dequant_launch

    w = torch.randn(40, 1024, generator=rng).to(device) * 3
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    launch = state_dequant_launch(packed, state, dtype)
    assert launch is not None and state_dequant_launch(packed, state, dtype) is launch
    expected = F.dequantize_4bit(packed, state).to(dtype)
    assert torch.equal(launch.launch(), expected)
    with torch.no_grad():
        (state.state2.absmax if nested else state.absmax).mul_(0.5)
    relaunch = state_dequant_launch(packed, state, dtype)
    assert relaunch is not launch
    assert torch.equal(relaunch.launch(), F.dequantize_4bit(packed, state).to(dtype))


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_functional_dequantize_uses_the_kept_launch_where_triton_serves(device, rng, monkeypatch, nested):
    """functional.dequantize_4bit takes the launch kept on the state when Triton serves the op
    (made to hold here on any device), giving what the op gives; transposed and out= as before."""
    from tritonbits.backends import registry
    from tritonbits.backends.triton import quant_4bit

    w = torch.randn(24, 512, generator=rng).to(device=device, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, compress_statistics=nested)
    expected = F.dequantize_4bit(packed, state)  # before the patch: the op
    monkeypatch.setattr(registry, "triton_module", lambda op, tensor: quant_4bit)
    got = F.dequantize_4bit(packed, state)
    assert "_kept_launches" in state.__dict__
    assert torch.equal(got, expected)
    out = torch.empty_like(expected)
    assert F.dequantize_4bit(packed, state, out=out) is out and torch.equal(out, expected)
    assert torch.equal(F.dequantize_4bit(packed.view(1, -1), state), expected.t())
