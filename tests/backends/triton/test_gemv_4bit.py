"""Fused 4-bit gemv kernel against dequantize-then-matmul (the reference)."""

import pytest
import torch
from support import count_calls

import tritonbits.functional as F


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(48, 256), (33, 128)])
def test_matches_reference(device, launcher, reference, rng, dtype, rows, quant_type, shape):
    N, K = shape
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=dtype)
    args = (a, packed, [N, K], state.absmax, state.code, 64)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    assert out.shape == (rows, N) and out.dtype == dtype
    # Same decoded weight in dtype; sums differ only by float32 accumulation order and the final
    # rounding to dtype: within 2 ulps of dtype relative to the output scale.
    eps = torch.finfo(dtype).eps
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * eps * scale + 1e-5


@pytest.mark.parametrize("rows", [1, 5])
def test_split_k_and_batch_dims(device, launcher, reference, rng, monkeypatch, rows):
    from tritonbits.backends.triton import gemv_4bit as kernels

    # small tiles, so that few rows of W and a long K make the launcher split K across programs
    monkeypatch.setattr(kernels, "CONFIGS", [(1, 1, 16, 128, 4, 1, False, True), (16, 16, 16, 128, 4, 1, True, True)])
    assert kernels._split_k(1, 4096, 128, torch.device(device)) > 1
    N, K = 16, 4096
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4", quant_storage=torch.bfloat16)
    a = torch.randn(rows, 1, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    args = (a, packed, [N, K], state.absmax, state.code, 128)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    assert out.shape == (rows, 1, N)
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize(
    "config",
    [
        (1, 8, 256, 4, 1, False, False),
        (1, 8, 256, 4, 1, False, True),
        (4, 8, 256, 4, 1, False, False),
        (2, 4, 512, 4, 1, False, False),
        (4, 16, 256, 4, 1, False, True),
        (2, 8, 512, 4, 1, False, True),
        (16, 32, 256, 4, 1, True, True),
        (16, 32, 64, 4, 3, True, False, 2),
        (1, 8, 256, 4, 1, False, True, 1, 2),
        (16, 32, 64, 4, 1, True, False, 1, 2),
        (1, 4, 256, 4, 1, False, True, 1, 1, True),
        (1, 2, 512, 2, 1, False, True, 1, 1, True),
        (4, 4, 256, 4, 1, False, True, 1, 1, True),
        (2, 2, 256, 4, 1, False, True, 1, 1, True),
        (1, 4, 256, 2, 1, False, False, 1, 1, True),
    ],
    ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{'dot' if c[5] else 'fma'}{'-perm' if c[6] else ''}"
    + (f"-ahead{c[8]}" if len(c) > 8 else "")
    + ("-rows-in-thread" if len(c) > 9 and c[9] else ""),
)
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_every_kernel_variant(device, launcher, rng, config, rows, nested):
    """Each launch configuration (CUDA cores one or several rows per program, tensor cores; A
    permuted or not) against the op's reference, more rows than BLOCK_M included."""
    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    N, K = 26, 1024  # N: a partial last block of rows for every BLOCK_N
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=nested)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.float16)
    if nested:
        inner = state.state2
        nested_args = (inner.code, inner.absmax, state.offset.reshape(1), inner.blocksize)
        args = (
            a,
            packed,
            [N, K],
            state.absmax,
            inner.code,
            inner.absmax,
            state.offset,
            inner.blocksize,
            state.code,
            64,
        )
        expected = REFERENCES["gemv_4bit_nested"](*args)
    else:
        nested_args = None
        expected = REFERENCES["gemv_4bit"](a, packed, [N, K], state.absmax, state.code, 64)
    launch = GemvLaunch(rows, N, K, a.dtype, a.device, _as_words(packed), state.absmax, nested_args, state.code, 64,
                        config)  # fmt: skip
    out = launch.launch(a)
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(a.dtype).eps * scale


@pytest.mark.parametrize("rows", [3, 16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_split_k_reduced_by_the_last_split(device, rng, rows, with_bias):
    """Tensor cores with reduce_last: the K-splits' partial tiles summed in split order by the
    last to arrive, in one launch. Within the dtype's rounding of the reference, the same output
    on every launch (the arrival counts go back to 0), and equal to the atomic-add variant's up
    to the order of its float32 additions."""
    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    N, K = 40, 4096  # N: two programs of 32 rows of W, the second partial
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=False)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    bias = torch.randn(N, generator=rng).to(device=device, dtype=torch.bfloat16) if with_bias else None
    expected = REFERENCES["gemv_4bit"](a, packed, [N, K], state.absmax, state.code, 64).float()
    if with_bias:
        expected += bias.float()
    launches = {
        reduce_last: GemvLaunch(rows, N, K, a.dtype, a.device, _as_words(packed), state.absmax, None, state.code, 64,
                                (16, 32, 64, 4, 1, True, False, 64, 1, False, False, reduce_last), has_bias=with_bias)
        for reduce_last in (False, True)
    }  # fmt: skip
    launch = launches[True]
    assert launch.split_k > 1 and launch.reduce_last and not launches[False].reduce_last
    out = launch.launch(a, bias)
    assert out.dtype == a.dtype and out.shape == (rows, N)
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 2 * torch.finfo(a.dtype).eps * scale
    assert int(launch.counts.abs().sum()) == 0
    again = launch.launch(a, bias)
    assert torch.equal(again, out)
    atomic = launches[False].launch(a, bias)
    assert (atomic.float() - out.float()).abs().max().item() <= torch.finfo(a.dtype).eps * scale


def test_reduce_last_needs_tensor_cores(device, rng):
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    packed, state = F.quantize_4bit(torch.randn(8, 256, generator=rng).to(device), compress_statistics=False)
    with pytest.raises(ValueError, match="tensor-core kernel"):
        GemvLaunch(1, 8, 256, torch.bfloat16, packed.device, _as_words(packed), state.absmax, None, state.code, 64,
                   (1, 4, 256, 4, 1, False, True, 1, 1, False, False, True))  # fmt: skip


@pytest.mark.parametrize("absmax_blocksize", [2, 4, 256])
@pytest.mark.parametrize("permute_a", [True, False], ids=["permuted", "as-stored"])
def test_rows_kernel_nested_outer_scales(device, rng, absmax_blocksize, permute_a):
    """The rows kernel's nested decode where the outer scale changes within a tile (2 blocks per
    outer scale, 4 per tile: one scale per word), at the tile's edge (4) and only between rows
    (256), on random absmax codes and outer scales against the op's reference."""
    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    N, K = 7, 1024
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=False)
    blocks = N * K // 64
    absmax = torch.randint(0, 256, (blocks,), generator=rng, dtype=torch.uint8).to(device)
    absmax_code = torch.rand(256, generator=rng).to(device)
    absmax_scale = (torch.rand(-(-blocks // absmax_blocksize), generator=rng) + 0.5).to(device)
    offset = torch.tensor(0.25, device=device)
    a = torch.randn(1, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    expected = REFERENCES["gemv_4bit_nested"](a, packed, [N, K], absmax, absmax_code, absmax_scale, offset,
                                              absmax_blocksize, state.code, 64).float()  # fmt: skip
    launch = GemvLaunch(1, N, K, a.dtype, a.device, _as_words(packed), absmax,
                        (absmax_code, absmax_scale, offset.reshape(1), absmax_blocksize), state.code, 64,
                        (1, 4, 256, 2, 1, False, permute_a, 1, 1, True))  # fmt: skip
    out = launch.launch(a).float()
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["aligned", "odd-offset", "odd-row-stride"])
def test_rows_kernel_reads_16bit_a_as_stored(device, rng, dtype, layout):
    """Rows of A read as stored in 32-bit pairs (no permute): both 16-bit dtypes, and an A
    starting at an odd element or with an odd row stride (copied to an aligned buffer first),
    against the reference."""
    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    N, K = 10, 2048
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=False)
    rows = 2 if layout == "odd-row-stride" else 1
    stored = torch.randn(rows, K + 1, generator=rng).to(device=device, dtype=dtype)
    a = stored[:, 1:] if layout == "odd-offset" else stored[:, :K] if rows == 2 else stored[:, :K].contiguous()
    launch = GemvLaunch(rows, N, K, dtype, a.device, _as_words(packed), state.absmax, None, state.code, 64,
                        (1, 4, 512, 2, 1, False, False, 1, 1, True))  # fmt: skip
    out = launch.launch(a)
    expected = REFERENCES["gemv_4bit"](a, packed, [N, K], state.absmax, state.code, 64).float()
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 2 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("block_n", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_kernel_byte_pairs_equal_one_lookup_per_code(device, rng, nested, block_n, dtype):
    """Byte-pair decoding (one gather of a 256-entry table of code pairs per byte) gives the same
    bits as one gather per code: the same float32 code values meet the same products and sums.
    Rows of W left over in the last program (N % block_n) and a random 16-entry code included."""
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words, nested_absmax_args

    N, K = 11, 512
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=nested)
    a = torch.randn(1, K, generator=rng).to(device=device, dtype=dtype)
    random_code = torch.sort(torch.randn(16, generator=rng)).values.clamp(-1, 1).to(device)
    for code in (state.code, random_code):
        outs = []
        for byte_pairs in (False, True):
            config = (1, block_n, 256, 2, 1, False, False, 1, 1, True, byte_pairs)
            launch = GemvLaunch(1, N, K, dtype, a.device, _as_words(packed), state.absmax, nested_absmax_args(state),
                                code, 64, config)  # fmt: skip
            outs.append(launch.launch(a))
        assert torch.equal(outs[0], outs[1])
        if code is state.code:
            expected = a.float() @ F.dequantize_4bit(packed, state).float().t()
            bound = 2 * torch.finfo(dtype).eps * expected.abs().max().item()
            assert (outs[1].float() - expected).abs().max().item() <= bound


def test_byte_pairs_need_rows_in_thread(device, rng):
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    packed, state = F.quantize_4bit(torch.randn(8, 256, generator=rng).to(device), compress_statistics=False)
    with pytest.raises(ValueError, match="byte-pair"):
        GemvLaunch(1, 8, 256, torch.bfloat16, packed.device, _as_words(packed), state.absmax, None, state.code, 64,
                   (1, 4, 256, 4, 1, False, False, 1, 1, False, True))  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        (1, 4, 256, 4, 1, False, True, 8),
        (1, 4, 256, 4, 1, False, False),
        (4, 8, 256, 4, 1, False, False, 8),
        (16, 32, 64, 4, 3, True, False, 8),
        (16, 32, 256, 4, 1, True, True),
        (1, 4, 256, 4, 1, False, True, 8, 1, True),
        (4, 2, 256, 4, 1, False, True, 8, 1, True),
    ],
    ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{'dot' if c[5] else 'fma'}{'-perm' if c[6] else ''}",
)
def test_bias_added_in_kernel(device, rng, config):
    """A launch built with a bias adds it to the float32 sums before rounding (once, also when K
    is split across programs): within the dtype's rounding of dequantize-then-linear with bias."""
    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton.gemv_4bit import GemvLaunch, _as_words

    N, K, rows = 24, 4096, 3
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=False)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    bias = torch.randn(N, generator=rng).to(device=device, dtype=torch.bfloat16)
    launch = GemvLaunch(rows, N, K, a.dtype, a.device, _as_words(packed), state.absmax, None, state.code, 64,
                        config, has_bias=True)  # fmt: skip
    if len(config) > 7:
        assert launch.split_k > 1
    out = launch.launch(a, bias)
    expected = REFERENCES["gemv_4bit"](a, packed, [N, K], state.absmax, state.code, 64).float() + bias.float()
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= 2 * torch.finfo(a.dtype).eps * scale
    with pytest.raises(ValueError, match="with a bias"):
        launch.launch(a)


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("blocksize, shape", [(32, (20, 96)), (256, (40, 512)), (4096, (8, 4096))])
def test_block_sizes_and_row_counts(device, launcher, reference, rng, rows, blocksize, shape):
    N, K = shape
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    args = (a, packed, [N, K], state.absmax, state.code, blocksize)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nested_absmax_decoded_in_kernel(device, launcher, reference, rng, rows, dtype):
    N, K = 24, 768
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=dtype)
    inner = state.state2
    args = (a, packed, [N, K], state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize, state.code, 64)
    out = launcher("gemv_4bit_nested")(*args)
    expected = reference("gemv_4bit_nested")(*args)
    # the reference decodes the absmax as functional.dequantize_4bit does
    dense = F.dequantize_4bit(packed, state).to(dtype)
    assert torch.equal(expected, torch.nn.functional.linear(a, dense))
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * scale + 1e-5


def _op_launch(launcher, a, packed, state):
    """The op launcher's result for the weight (packed, state): what a kept launch must equal."""
    N, K = state.shape
    if state.nested:
        inner = state.state2
        return launcher("gemv_4bit_nested")(a, packed, [N, K], state.absmax, inner.code, inner.absmax, state.offset,
                                            inner.blocksize, state.code, state.blocksize)  # fmt: skip
    return launcher("gemv_4bit")(a, packed, [N, K], state.absmax, state.code, state.blocksize)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (2, torch.float32), (5, torch.float16)])
def test_kept_launch_equals_the_op_and_follows_state_changes(device, launcher, rng, nested, rows, dtype):
    from tritonbits.backends.triton.gemv_4bit import state_gemv_launch

    N, K = 40, 512
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=rng).to(device), compress_statistics=nested)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=dtype)
    launch = state_gemv_launch(a, packed, state)
    assert launch is not None
    assert torch.equal(launch.launch(a), _op_launch(launcher, a, packed, state))
    assert torch.equal(launch.launch(a), launch.launch(a.clone()))
    assert state_gemv_launch(a, packed, state) is launch  # kept on the state

    # A that is not 16-byte aligned (the compiled kernel was specialized on the first A's alignment)
    shifted = torch.empty(rows * K + 1, device=device, dtype=dtype)[1:].view(rows, K)
    shifted.copy_(a)
    assert torch.equal(launch.launch(shifted), launch.launch(a))

    # in-place changes of the weight's state or codes give a new launch with the new values
    with torch.no_grad():
        (state.state2.absmax if nested else state.absmax).mul_(2)
    relaunched = state_gemv_launch(a, packed, state)
    assert relaunched is not launch
    assert torch.equal(relaunched.launch(a), _op_launch(launcher, a, packed, state))
    packed.copy_(packed.flip(0))
    flipped = state_gemv_launch(a, packed, state)
    assert flipped is not relaunched
    assert torch.equal(flipped.launch(a), _op_launch(launcher, a, packed, state))

    # a new weight with the same state object: rebuilt for the new codes
    other = packed.clone()
    assert torch.equal(state_gemv_launch(a, other, state).launch(a), _op_launch(launcher, a, other, state))


def test_kept_launches_are_not_copied_or_pickled(device, rng):
    import copy
    import pickle

    from tritonbits.backends.triton.gemv_4bit import state_gemv_launch

    packed, state = F.quantize_4bit(torch.randn(16, 256, generator=rng).to(device))
    a = torch.randn(1, 256, generator=rng).to(device)
    state_gemv_launch(a, packed, state).launch(a)
    assert "_kept_launches" in state.__dict__
    for clone in (copy.deepcopy(state), copy.copy(state), pickle.loads(pickle.dumps(state))):
        assert "_kept_launches" not in clone.__dict__
        assert clone == state


def test_kept_launch_declines_what_the_kernel_does_not_take(device, rng):
    from tritonbits.backends.triton.gemv_4bit import state_gemv_launch

    packed, state = F.quantize_4bit(torch.randn(16, 100, generator=rng).to(device), blocksize=64)  # K % 64 != 0
    assert state_gemv_launch(torch.randn(1, 100).to(device), packed, state) is None
    packed, state = F.quantize_4bit(torch.randn(16, 256, generator=rng).to(device))
    assert state_gemv_launch(torch.randn(64, 256).to(device), packed, state) is None  # too many rows


def test_kept_launch_follows_a_weight_whose_storage_moves(device, launcher, rng):
    """FSDP2 frees an unsharded weight's storage after forward and allocates it again before
    backward: same tensor, new address. The launch is kept and reads the new address."""
    from tritonbits.backends.triton.gemv_4bit import state_gemv_launch

    packed, state = F.quantize_4bit(torch.randn(32, 256, generator=rng).to(device))
    a = torch.randn(1, 256, generator=rng).to(device)
    launch = state_gemv_launch(a, packed, state)
    expected = launch.launch(a)
    codes = packed.clone()
    storage = packed.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    placeholder = torch.empty(nbytes, dtype=torch.uint8, device=device)  # the old address is likely taken
    storage.resize_(nbytes)
    # FSDP2 copies the gathered codes in with the version counter preserved
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(packed):
        packed.copy_(codes)
    assert state_gemv_launch(a, packed, state) is launch
    assert torch.equal(launch.launch(a), expected)
    assert torch.equal(state_gemv_launch(a, packed, state).launch(a), _op_launch(launcher, a, packed, state))
    del placeholder


def test_linear4bit_eager_plan_serves_repeated_calls_and_follows_changes(device, rng, monkeypatch):
    """After one eager call through a kept gemv launch, Linear4bit's next calls with the same
    input shape and dtype go straight to that launch (not through matmul_4bit); an in-place
    change of the absmax, new codes storage, another bias dtype or input shape, or a needed
    gradient takes the full path again, with the right result each time."""
    import copy

    import tritonbits as bnb
    from tritonbits.backends import registry
    from tritonbits.backends.triton import gemv_4bit
    from tritonbits.nn import linear4bit

    real_triton_module = registry.triton_module
    monkeypatch.setattr(registry, "triton_module",
                        lambda op, tensor: gemv_4bit if op == "gemv_4bit" else real_triton_module(op, tensor))  # fmt: skip
    full_path_calls = count_calls(monkeypatch, linear4bit, "matmul_4bit")
    layer = bnb.nn.Linear4bit(256, 48, compute_dtype=torch.bfloat16, quant_type="nf4").to(torch.bfloat16)
    layer = layer.to(device).quantize_()

    def check(x, full_path):
        calls = len(full_path_calls)
        with torch.no_grad():
            out = layer(x)
        assert len(full_path_calls) - calls == int(full_path)
        weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        expected = torch.nn.functional.linear(x.to(torch.bfloat16), weight, layer.bias.to(torch.bfloat16)).to(x.dtype)
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())

    def activations(*shape):
        return torch.randn(*shape, generator=rng).to(device=device, dtype=torch.bfloat16)

    state = layer.weight.quant_state
    x = activations(1, 256)
    check(x, full_path=True)
    check(activations(1, 256), full_path=False)
    assert "_eager_plan" in state.__dict__ and "_eager_plan" not in copy.deepcopy(state).__dict__
    with torch.no_grad():
        (state.state2.absmax if state.nested else state.absmax).mul_(0.5)  # the kept launch is rebuilt
    check(x, full_path=True)
    check(x, full_path=False)
    layer.weight.data.copy_(layer.weight.data.flip(0))  # same storage: the launch reads the new codes
    check(x, full_path=False)
    layer.weight.data = layer.weight.data.flip(0).clone()  # new storage: a new launch
    check(x, full_path=True)
    check(activations(3, 256), full_path=True)  # another row count
    check(x, full_path=True)
    layer.bias.data = layer.bias.data.float()  # matmul_4bit casts the bias to the input's dtype
    check(x, full_path=True)
    check(x, full_path=True)
    x_grad = x.clone().requires_grad_()
    layer(x_grad).float().sum().backward()  # grad mode: the autograd path, the input gets its gradient
    assert x_grad.grad is not None and len(full_path_calls) == 8


@pytest.mark.parametrize("K, N", [(4096, 4096), (8192, 28672)])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_decode_sizes_match(device, launcher, reference, rng, K, N, rows, nested):
    """The default launch configurations at real decode sizes (one row: W's rows in each thread;
    16 rows: tensor cores) against the reference, flat and nested absmax."""
    if device != "cuda":
        pytest.skip("real sizes only on a GPU (the interpreter would take minutes)")
    w = torch.randn(N, K, generator=rng).to(device=device, dtype=torch.bfloat16) * K**-0.5
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    if nested:
        inner = state.state2
        nested_state = (inner.code, inner.absmax, state.offset, inner.blocksize)
        args = (a, packed, [N, K], state.absmax, *nested_state, state.code, 64)
        name = "gemv_4bit_nested"
    else:
        args = (a, packed, [N, K], state.absmax, state.code, 64)
        name = "gemv_4bit"
    out = launcher(name)(*args)
    expected = reference(name)(*args).float()
    scale = expected.abs().max().item()
    bound = 2 * torch.finfo(torch.bfloat16).eps * scale  # as test_matches_reference
    assert out.shape == (rows, N) and (out.float() - expected).abs().max().item() <= bound


def test_one_row_config_by_dtype_and_weight_size():
    """One row of 16-bit A on a weight up to PAIRS_MAX_WEIGHT elements is read as stored; a
    larger weight, or float32 A, takes A permuted."""
    from tritonbits.backends.triton.gemv_4bit import PAIRS_MAX_WEIGHT, _config

    K = 4096
    small, large = PAIRS_MAX_WEIGHT // K, PAIRS_MAX_WEIGHT // K + 8
    permute_a = 6
    assert _config(1, small, K, torch.bfloat16)[permute_a] is False
    assert _config(1, small, K, torch.float16)[permute_a] is False
    assert _config(1, large, K, torch.bfloat16)[permute_a] is True
    assert _config(1, small, K, torch.float32)[permute_a] is True
    assert _config(2, small, K, torch.bfloat16)[5] is True  # two rows: tensor cores
