"""Fused Triton optimizer updates against the PyTorch reference (``backends/torch/optim.py``).

Each step starts both implementations from the same inputs (the reference's previous output), so
a difference cannot grow over the steps and every step is checked on its own.

What is compared, and how closely:

- 8-bit codes and absmax, 32-bit states: exactly (``torch.equal``, NaN equal to NaN). They do
  not depend on a square root.
- Parameters: within 1 unit in the last place of their dtype (``rtol=finfo.eps``, ``atol=0``),
  and at least half of them bit-identical. The only difference is the square root: the kernel's
  ``sqrt_rn`` is IEEE-rounded; torch's float32 ``sqrt`` on CPU (AVX2 build) is not (1 ulp off
  for ~18% of inputs). On CUDA both are IEEE and ``tests/gpu/check_optim_kernels.py`` asserts
  bit-identity.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from tritonbits.backends.torch import optim as torch_optim
from tritonbits.backends.triton import interpreting
from tritonbits.backends.triton import optim as triton_optim
from tritonbits.codebooks import create_dynamic_map

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 255, 256, 1000]
RULES_8BIT = ["adam", "momentum", "rmsprop", "adagrad", "lion", "ademamix"]
RULES_32BIT = ["adam", "lamb", "momentum", "lars", "rmsprop", "adagrad", "lion", "ademamix"]
TWO_STATE = ("adam", "lamb", "ademamix")
STEPS = 3
HYPER = dict(beta1=0.9, beta2=0.99, beta3=0.999, alpha=5.0, eps=1e-6, lr=1e-2, weight_decay=0.01, gnorm_scale=0.75)


@pytest.fixture(scope="module")
def qmaps():
    return create_dynamic_map(signed=True), create_dynamic_map(signed=False)


def _state1_values(shape, name, rng):
    """Random first states: momenta are signed; rmsprop/adagrad's state1 is a sum of squares."""
    values = torch.randn(shape, generator=rng) * 0.1
    return values.abs() if name in ("rmsprop", "adagrad") else values


def _quantized(values, qmap):
    """Codes and absmax of float32 ``values`` (blocks of 256), as the optimizer stores them."""
    from tritonbits._ops import REFERENCES

    codes, absmax = REFERENCES["quantize_blockwise"](values.reshape(-1), qmap, 256)
    return codes.view(values.shape), absmax


def _states_8bit(name, shape, rng, qmaps):
    """Random (non-zero) 8-bit states: (state1, state2, absmax1, absmax2)."""
    n = math.prod(shape)
    rows = [_quantized(_state1_values((n,), name, rng), qmaps[0]) for _ in range(2 if name == "ademamix" else 1)]
    if name == "ademamix":  # two momenta, each quantized as its own [n] tensor
        s1 = torch.stack([codes for codes, _ in rows]).view(2, *shape)
        a1 = torch.stack([absmax for _, absmax in rows])
    else:
        s1, a1 = rows[0][0].view(shape), rows[0][1]
    if name not in TWO_STATE:
        return s1, None, a1, None
    s2, a2 = _quantized(torch.rand(shape, generator=rng) * 0.01, qmaps[1])
    return s1, s2, a1, a2


def _states_32bit(name, shape, rng):
    shape1 = (2, *shape) if name == "ademamix" else shape
    s1 = _state1_values(shape1, name, rng)
    s2 = torch.rand(shape, generator=rng) * 0.01 if name in TWO_STATE else None
    return s1, s2


def _clone(tensors, device):
    return [None if t is None else t.clone().to(device) for t in tensors]


def _assert_same(actual, expected):
    """Equal in dtype, shape and values, NaN equal to NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.is_floating_point():
        assert torch.equal(actual.isnan(), expected.isnan())
        actual, expected = actual[~expected.isnan()], expected[~expected.isnan()]
    assert torch.equal(actual, expected)


def _assert_params_close(actual, expected, before):
    """p after a step: within 1 ulp of its dtype plus 2**-21 of the update (see the module docstring).

    One ulp of a square root changes the update by 2**-24 relative; the extra factor covers the
    division after it and rounding to p's dtype, and the update term covers p near 0, where the
    update is larger than p itself. NaN where the reference has NaN.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    dtype = expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    actual, expected, before = actual[~nan].float(), expected[~nan].float(), before[~nan].float()
    bound = torch.finfo(dtype).eps * expected.abs() + 2.0**-21 * (expected - before).abs()
    assert ((actual - expected).abs() <= bound).all(), (actual - expected).abs().max()
    if actual.numel():
        assert (actual == expected).float().mean() >= 0.5


def _run_8bit(fn, name, g, p, states, qmaps, step, hyper, skip_zeros=False):
    s1, s2, a1, a2 = states
    two = name in TWO_STATE
    fn(name, g, p, s1, s2, hyper["beta1"], hyper["beta2"], hyper["beta3"], hyper["alpha"], hyper["eps"], step,
       hyper["lr"], qmaps[0], qmaps[1] if two else None, a1, a2, hyper["weight_decay"], hyper["gnorm_scale"],
       skip_zeros)  # fmt: skip


def _check_8bit_steps(launcher, reference, name, dtype, shape, rng, device, qmaps, hyper=HYPER, grads=None,
                      skip_zeros=False, p_view=None):  # fmt: skip
    p = (torch.randn(shape, generator=rng)).to(dtype)
    states = list(_states_8bit(name, shape, rng, qmaps))
    qm = _clone(qmaps, device)
    for step in range(1, STEPS + 1):
        g = grads[step - 1] if grads is not None else (torch.randn(shape, generator=rng) * 0.5).to(dtype)
        ours_p, *ours_states = _clone([p, *states], device)
        ref_p, *ref_states = _clone([p, *states], "cpu")
        if p_view is not None:  # update a non-contiguous view of the same values
            ours_p = p_view(ours_p)
            ref_p = p_view(ref_p)
            g = p_view(g)
        _run_8bit(launcher("optimizer_update_8bit_blockwise"), name, g.to(device), ours_p, ours_states, qm, step,
                  hyper, skip_zeros)  # fmt: skip
        _run_8bit(reference("optimizer_update_8bit_blockwise"), name, g, ref_p, ref_states, qmaps, step, hyper,
                  skip_zeros)  # fmt: skip
        for ours, ref in zip(ours_states, ref_states):
            if ref is not None:
                _assert_same(ours.cpu(), ref)  # exact: codes and absmax do not involve sqrt
        _assert_params_close(ours_p.cpu(), ref_p, p if p_view is None else p_view(p))
        p, states = ref_p.contiguous() if p_view is None else ref_p, ref_states
        if p_view is not None:
            p = p_view(ref_p)  # back to the storage layout (the view functions are involutions)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", RULES_8BIT)
def test_8bit_blockwise_matches_reference(launcher, reference, rng, device, qmaps, name, dtype, size):
    _check_8bit_steps(launcher, reference, name, dtype, (size,), rng, device, qmaps)


@pytest.mark.parametrize("name", RULES_8BIT)
def test_8bit_blockwise_options(launcher, reference, rng, device, qmaps, name):
    # No weight decay, skip_zeros with exact-zero gradients, and (adam/ademamix) non-finite
    # gradients, which reset the states and keep p. 2-D shape with a partial last block.
    shape = (7, 99)
    grads = []
    for _ in range(STEPS):
        g = torch.randn(shape, generator=rng)
        g[torch.rand(shape, generator=rng) < 0.2] = 0.0
        if name in TWO_STATE:
            g[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
        grads.append(g)
    hyper = dict(HYPER, weight_decay=0.0, gnorm_scale=1.0)
    _check_8bit_steps(launcher, reference, name, torch.float32, shape, rng, device, qmaps, hyper, grads, True)


@pytest.fixture
def blocks_per_program(request, monkeypatch):
    """Sets the 8-bit kernel's state blocks per program (and warps, unused by the interpreter)."""
    from tritonbits.backends.triton import optim

    blocks, warps = request.param
    monkeypatch.setattr(optim, "_BLOCKS_PER_PROGRAM", blocks)
    monkeypatch.setattr(optim, "_WARPS_8BIT", warps)
    return blocks


# Sizes: a partial first block; whole blocks with a partial last program (768 = 3 blocks); a
# partial last block (1000, 1300); whole programs only (1024: the unmasked EVEN variant).
@pytest.mark.parametrize("blocks_per_program", [(2, 2), (4, 4)], indirect=True, ids=["2blocks", "4blocks"])
@pytest.mark.parametrize("size", [255, 768, 1024, 1300])
@pytest.mark.parametrize("name", RULES_8BIT)
def test_8bit_blockwise_blocks_per_program(launcher, reference, rng, device, qmaps, blocks_per_program, name, size):
    _check_8bit_steps(launcher, reference, name, torch.float32, (size,), rng, device, qmaps)


@pytest.mark.parametrize("blocks_per_program", [(2, 2)], indirect=True, ids=["2blocks"])
@pytest.mark.parametrize("name", ["adam", "momentum", "lion"])
def test_8bit_blockwise_blocks_per_program_options(launcher, reference, rng, device, qmaps, blocks_per_program, name):
    # bfloat16, skip_zeros with exact-zero gradients, gnorm_scale 1 (the gradient is not
    # multiplied), (adam) non-finite gradients; 2048 elements: the unmasked variant.
    shape = (8, 256)
    grads = []
    for _ in range(STEPS):
        g = torch.randn(shape, generator=rng)
        g[torch.rand(shape, generator=rng) < 0.2] = 0.0
        if name in TWO_STATE:  # (the other rules store the NaN: test_8bit_blockwise_nan_gradient)
            g[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
        grads.append(g.bfloat16())
    hyper = dict(HYPER, gnorm_scale=1.0)
    _check_8bit_steps(launcher, reference, name, torch.bfloat16, shape, rng, device, qmaps, hyper, grads, True)


@pytest.mark.parametrize("blocks_per_program", [(1, 2), (4, 4)], indirect=True, ids=["1block", "4blocks"])
@pytest.mark.parametrize("size", [1024, 1300])
@pytest.mark.parametrize("name", RULES_8BIT)
def test_8bit_blockwise_shared_search(launcher, reference, rng, device, qmaps, blocks_per_program, monkeypatch, name,
                                      size):  # fmt: skip
    # The opt-in requantize search in shared memory (the dynamic maps' cells fit), with a NaN
    # gradient at the first step (block 1), against the reference bit for bit.
    from tritonbits.backends.triton import optim

    monkeypatch.setattr(optim, "_SHARED_SEARCH", True)
    grads = [torch.randn(size, generator=rng) * 0.5 for _ in range(STEPS)]
    grads[0][300] = float("nan")
    _check_8bit_steps(launcher, reference, name, torch.float32, (size,), rng, device, qmaps,
                      dict(HYPER, gnorm_scale=1.0), grads)  # fmt: skip


# 1024: whole programs (the unmasked EVEN variant) at 1 and 2 blocks per program; 1300: masked.
@pytest.mark.parametrize("blocks_per_program", [(1, 2), (2, 2)], indirect=True, ids=["1block", "2blocks"])
@pytest.mark.parametrize("size", [1024, 1300])
@pytest.mark.parametrize("name", RULES_8BIT)
def test_8bit_blockwise_nan_gradient(launcher, reference, rng, device, qmaps, blocks_per_program, name, size):
    # One NaN gradient at the first step (block 1). adam/ademamix reset its states and keep p; the
    # other rules store the NaN, and then, as in the reference (torch's amax), that block's absmax
    # is NaN and all its codes 255 (254 where the value is negative), so the next steps read the
    # whole block as NaN. tl.max drops NaN (fmaxf on the GPU, nanmax in the interpreter): the
    # kernel kept a finite absmax for that block.
    grads = [torch.randn(size, generator=rng) * 0.5 for _ in range(STEPS)]
    grads[0][300] = float("nan")
    hyper = dict(HYPER, gnorm_scale=1.0)
    _check_8bit_steps(launcher, reference, name, torch.float32, (size,), rng, device, qmaps, hyper, grads)


@pytest.mark.parametrize("name", ["adam", "momentum", "lion"])
def test_8bit_blockwise_non_contiguous(launcher, reference, rng, device, qmaps, name):
    transpose = lambda t: t.t()  # noqa: E731  (a [33, 31] storage seen as its [31, 33] transpose)
    _check_8bit_steps(launcher, reference, name, torch.float32, (33, 31), rng, device, qmaps, p_view=transpose)


@triton.jit
def _requantize_kernel(values_ptr, codes_ptr, absmax_ptr, tables_ptr, n, SIGNED: tl.constexpr, BLOCKS: tl.constexpr,
                       INTERPRET: tl.constexpr):  # fmt: skip
    # The optimizer kernel's tile (relative offsets from the program's first block) and masks.
    base = tl.program_id(0) * (BLOCKS * 256)
    first_block = tl.program_id(0) * BLOCKS
    blocks, offsets, mask = triton_optim._block_tile(BLOCKS, n - base)
    values = tl.load(values_ptr + base + offsets, mask=mask, other=0.0)
    triton_optim._requantize(values, codes_ptr + base, absmax_ptr + first_block, tables_ptr, offsets, mask, blocks,
                             (n + 255) // 256 - first_block, SIGNED=SIGNED, EVEN=False, INTERPRET=INTERPRET)  # fmt: skip


def _requantize_values(qmap, signed, rng):
    """Blocks of 256 values probing the search and the sign rules, and a block holding NaNs."""
    sorted_qmap = qmap.sort(stable=True).values
    m = (sorted_qmap[:-1] + sorted_qmap[1:]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    near = torch.cat([m, torch.nextafter(m, up), torch.nextafter(m, down)])
    if signed:
        near = torch.cat([near, -near])
    near = near[near.abs() < 1]
    tiny = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149), 1e-30, -1e-30, 1e-9, -1e-9, 1e-7, -1e-7])
    random = torch.randn(4096, generator=rng) * 0.05
    values = torch.cat([near, tiny.repeat(20), random if signed else random.abs()])
    blocks = -(values.numel() // -255)
    values = torch.nn.functional.pad(values, (0, blocks * 255 - values.numel()))
    # +-1 in every block: absmax 1, so the kernel compares the values themselves (midpoints: ties).
    ones = torch.where(torch.rand(blocks, 1, generator=rng) < 0.5, 1.0, -1.0) if signed else torch.ones(blocks, 1)
    values = torch.cat([ones, values.view(blocks, 255)], dim=1)
    # Blocks with a large absmax, where the smallest values scale to (+-)0 but are not 0: the
    # rules look at the value, not at the scaled value.
    underflow = torch.tensor([2.0**-149, -(2.0**-149), 2.0**-140, -(2.0**-140), 1e-42, -1e-42, 1e-30, -1e-30])
    large = torch.cat([torch.full((1, 1), 3e4), underflow.repeat(32)[None, :255]], dim=1)
    # A NaN (and one with its sign bit set) makes the block's absmax NaN: every code is the rank
    # of NaN, stepped by the sign rules.
    nan = values[:1].clone()
    nan[0, 7], nan[0, 100] = float("nan"), -float("nan")
    return torch.cat([values, nan, large, -large if signed else large.abs()]).reshape(-1)[:-17].float()


@pytest.mark.parametrize("qmap_name", ["dynamic", "unsorted", "crowded", "zeros"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_requantize_matches_reference(rng, device, signed, qmap_name):
    # Codes and absmax of the 8-bit states, bit for bit (a NaN absmax equal to NaN), through the
    # sign rules' rank comparisons (sorted qmaps) and through their table (the others).
    qmap = create_dynamic_map(signed=signed)
    if qmap_name == "unsorted":
        qmap = torch.rand(256, generator=rng) * (2 if signed else 1) - (1 if signed else 0)
        qmap[0] = 0.0
    elif qmap_name == "crowded":
        qmap[200:230] = qmap[200] + torch.arange(30) * 2.0**-24  # equal and near-equal entries
    elif qmap_name == "zeros":  # several zero entries; signed: a -0.0 between two +0.0
        zero = int((qmap == 0).nonzero()[0])
        qmap[zero : zero + 3] = torch.tensor([0.0, -0.0, 0.0])
    values = _requantize_values(qmap, signed, rng)
    n = values.numel()
    codes, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(-(n // -256))
    torch_optim._requantize(values, codes, absmax, qmap, signed)

    _, tables = triton_optim._search_tables(qmap, torch.device(device), signed)
    arithmetic = qmap_name in ("dynamic", "crowded") or (qmap_name == "zeros" and not signed)
    assert int(tables[triton_optim.SPARE_WORD]) == arithmetic
    ours_codes = torch.empty(n, dtype=torch.uint8, device=device)
    ours_absmax = torch.empty(absmax.shape, device=device)
    _requantize_kernel[(triton.cdiv(absmax.numel(), 4),)](
        values.to(device), ours_codes, ours_absmax, tables, n, SIGNED=signed, BLOCKS=4, INTERPRET=interpreting()
    )
    _assert_same(ours_absmax.cpu(), absmax)  # exact
    _assert_same(ours_codes.cpu(), codes)  # exact


def test_8bit_blockwise_empty(launcher, device, qmaps):
    p = torch.empty(0, device=device)
    s1, a1 = torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, device=device)
    launcher("optimizer_update_8bit_blockwise")(
        "momentum", p.clone(), p, s1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-3, qmaps[0].to(device), None, a1, None,
        0.0, 1.0, False,
    )  # fmt: skip
    assert p.numel() == 0 and s1.numel() == 0


def _run_32bit(fn, name, g, p, s1, s2, unorm_vec, step, hyper, max_unorm=0.0, skip_zeros=False):
    param_norm = p.float().norm().item() if max_unorm > 0 else 0.0
    fn(name, g, p, s1, s2, unorm_vec, max_unorm, param_norm, hyper["beta1"], hyper["beta2"], hyper["beta3"],
       hyper["alpha"], hyper["eps"], hyper["weight_decay"], step, hyper["lr"], hyper["gnorm_scale"],
       skip_zeros)  # fmt: skip


def _check_32bit_steps(launcher, reference, name, dtype, shape, rng, device, hyper=HYPER, max_unorm=0.0,
                       zero_fraction=0.0, skip_zeros=False):  # fmt: skip
    p = torch.randn(shape, generator=rng).to(dtype)
    s1, s2 = _states_32bit(name, shape, rng)
    unorm = torch.zeros(1) if max_unorm > 0 else None
    for step in range(1, STEPS + 1):
        g = torch.randn(shape, generator=rng) * 0.5
        g[torch.rand(shape, generator=rng) < zero_fraction] = 0.0
        g = g.to(dtype)
        ours = _clone([p, s1, s2, unorm], device)
        ref = _clone([p, s1, s2, unorm], "cpu")
        _run_32bit(launcher("optimizer_update_32bit"), name, g.to(device), *ours, step, hyper, max_unorm, skip_zeros)
        _run_32bit(reference("optimizer_update_32bit"), name, g, *ref, step, hyper, max_unorm, skip_zeros)
        for mine, theirs in zip(ours[1:3], ref[1:3]):
            if theirs is not None:
                assert torch.equal(mine.cpu(), theirs)  # exact: the states do not involve sqrt
        if max_unorm > 0:
            # The squared norm is the reference's own PyTorch sum: exact on the same device. On a
            # GPU the reduction order differs from the CPU's: within float32 rounding (rtol 1e-6).
            if device == "cpu":
                assert torch.equal(ours[3].cpu(), ref[3])
            else:
                assert torch.allclose(ours[3].cpu(), ref[3], rtol=1e-6, atol=0)
        _assert_params_close(ours[0].cpu(), ref[0], p)
        p, s1, s2, unorm = ref


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", RULES_32BIT)
def test_32bit_matches_reference(launcher, reference, rng, device, name, dtype, size):
    _check_32bit_steps(launcher, reference, name, dtype, (size,), rng, device)


@pytest.mark.parametrize("name", RULES_32BIT)
def test_32bit_trust_ratio_and_skip_zeros(launcher, reference, rng, device, name):
    # max_unorm > 0 (LAMB/LARS's trust ratio, also accepted by every rule) with a small bound so
    # that it clips; no weight decay; skip_zeros with exact-zero gradients.
    hyper = dict(HYPER, weight_decay=0.0)
    _check_32bit_steps(launcher, reference, name, torch.float32, (5, 77), rng, device, hyper, max_unorm=0.002,
                       zero_fraction=0.2, skip_zeros=True)  # fmt: skip


def test_32bit_non_contiguous(launcher, reference, rng, device):
    p = torch.randn(40, 30, generator=rng).t()
    g = torch.randn(40, 30, generator=rng).t()
    s1, s2 = torch.randn(30, 40, generator=rng) * 0.1, torch.rand(40, 30, generator=rng).t() * 0.01
    ours, ref = _clone([p, s1, s2], device), _clone([p, s1, s2], "cpu")
    ours[0], ours[2] = ours[0].t().contiguous().t(), ours[2].t().contiguous().t()  # keep them transposed
    _run_32bit(launcher("optimizer_update_32bit"), "adam", g.to(device), *ours, None, 1, HYPER)
    _run_32bit(reference("optimizer_update_32bit"), "adam", g, *ref, None, 1, HYPER)
    assert not ours[0].is_contiguous()
    assert torch.equal(ours[1].cpu(), ref[1]) and torch.equal(ours[2].cpu(), ref[2])  # exact
    _assert_params_close(ours[0].cpu(), ref[0], p)


# ---------------------------------------------------------------------------------------------
# multi-tensor launches

MULTI_SIZES = [1000, 1, 255, 0, 256, 3000, 513]


@pytest.fixture
def kernels(launcher, monkeypatch):
    """The kernel module, with the one-launch size limit lowered so both launch paths run."""
    from tritonbits.backends.triton import optim

    launcher("optimizer_update_32bit")  # imports the module as the dispatcher would
    monkeypatch.setattr(optim, "_MULTI_MAX_NUMEL", 2048)
    return optim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", RULES_8BIT)
def test_multi_tensor_8bit_equals_per_tensor(kernels, rng, device, qmaps, name, dtype):
    two = name in TWO_STATE
    qm = _clone(qmaps, device)
    ps = [torch.randn(n, generator=rng).to(dtype).to(device) for n in MULTI_SIZES]
    gs = [(torch.randn(n, generator=rng) * 0.5).to(dtype).to(device) for n in MULTI_SIZES]
    states = [_clone(_states_8bit(name, (n,), rng, qmaps), device) for n in MULTI_SIZES]
    single = [_clone([p, *s], device) for p, s in zip(ps, states)]
    for step in (1, 2):
        kernels.multi_tensor_update_8bit_blockwise(
            name, gs, ps, [s[0] for s in states], [s[1] for s in states] if two else None, HYPER["beta1"],
            HYPER["beta2"], HYPER["beta3"], HYPER["alpha"], HYPER["eps"], step, HYPER["lr"], qm[0],
            qm[1] if two else None, [s[2] for s in states], [s[3] for s in states] if two else None,
            HYPER["weight_decay"], HYPER["gnorm_scale"],
        )  # fmt: skip
        for g, (p, *s) in zip(gs, single):
            _run_8bit(kernels.optimizer_update_8bit_blockwise, name, g, p, s, qm, step, HYPER)
    for p, s, (p1, *s1) in zip(ps, states, single):
        for mine, theirs in zip([p, *s], [p1, *s1]):
            if theirs is not None:
                assert torch.equal(mine, theirs)  # exact: the same kernel code on the same inputs


@pytest.mark.parametrize("blocks_per_program", [(2, 2), (4, 4)], indirect=True, ids=["2blocks", "4blocks"])
@pytest.mark.parametrize("sizes", [MULTI_SIZES, [1024, 2048, 1024]], ids=["mixed", "even"])
@pytest.mark.parametrize("name", ["adam", "lion", "ademamix"])
def test_multi_tensor_8bit_blocks_per_program(kernels, rng, device, qmaps, blocks_per_program, name, sizes):
    # Several state blocks per program, with partial last programs ("mixed") or none ("even").
    two = name in TWO_STATE
    qm = _clone(qmaps, device)
    ps = [torch.randn(n, generator=rng).to(device) for n in sizes]
    gs = [(torch.randn(n, generator=rng) * 0.5).to(device) for n in sizes]
    states = [_clone(_states_8bit(name, (n,), rng, qmaps), device) for n in sizes]
    single = [_clone([p, *s], "cpu") for p, s in zip(ps, states)]
    before = [p.cpu().clone() for p in ps]
    kernels.multi_tensor_update_8bit_blockwise(
        name, gs, ps, [s[0] for s in states], [s[1] for s in states] if two else None, HYPER["beta1"],
        HYPER["beta2"], HYPER["beta3"], HYPER["alpha"], HYPER["eps"], 1, HYPER["lr"], qm[0],
        qm[1] if two else None, [s[2] for s in states], [s[3] for s in states] if two else None,
        HYPER["weight_decay"], HYPER["gnorm_scale"],
    )  # fmt: skip
    for g, (p, *s), n in zip(gs, single, sizes):
        if n:  # the reference: each tensor alone
            _run_8bit(torch_optim.optimizer_update_8bit_blockwise, name, g.cpu(), p, s, qmaps, 1, HYPER)
    for p, s, (p1, *s1), p0 in zip(ps, states, single, before):
        for mine, theirs in zip(s, s1):
            if theirs is not None:
                assert torch.equal(mine.cpu(), theirs)  # exact: codes and absmax
        _assert_params_close(p.cpu(), p1, p0)


@pytest.mark.parametrize("name", RULES_32BIT)
def test_multi_tensor_32bit_equals_per_tensor(kernels, rng, device, name):
    ps = [torch.randn(n, generator=rng, dtype=torch.float32).to(device) for n in MULTI_SIZES]
    gs = [(torch.randn(n, generator=rng) * 0.5).to(device) for n in MULTI_SIZES]
    states = [_clone(_states_32bit(name, (n,), rng), device) for n in MULTI_SIZES]
    single = [_clone([p, *s], device) for p, s in zip(ps, states)]
    h = HYPER
    for step in (1, 2):
        kernels.multi_tensor_update_32bit(
            name, gs, ps, [s[0] for s in states], [s[1] for s in states], h["beta1"], h["beta2"], h["beta3"],
            h["alpha"], h["eps"], h["weight_decay"], step, h["lr"], h["gnorm_scale"],
        )  # fmt: skip
        for g, (p, s1, s2) in zip(gs, single):
            _run_32bit(kernels.optimizer_update_32bit, name, g, p, s1, s2, None, step, h)
    for p, s, (p1, *s1) in zip(ps, states, single):
        for mine, theirs in zip([p, *s], [p1, *s1]):
            if theirs is not None:
                assert torch.equal(mine, theirs)  # exact: the same kernel code on the same inputs


def test_multi_tensor_rejects_mixed_dtypes(kernels, device):
    ps = [torch.zeros(10, device=device), torch.zeros(10, device=device, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="ps must share one dtype"):
        kernels.multi_tensor_update_32bit("momentum", ps, ps, ps, None, 0.9, 0, 0, 0, 1e-8, 0.0, 1, 1e-3)


# ---------------------------------------------------------------------------------------------
# tritonbits.optim: parameters updated together by the multi-tensor launchers


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "Lion8bit", "SGD8bit", "AdEMAMix8bit", "RMSprop8bit"])
def test_optimizer_step_batches_parameters(kernels, monkeypatch, rng, device, cls_name):
    import tritonbits.optim as optim
    from tritonbits.optim import optimizer as base

    # Shapes: two get 8-bit state (>= 4096 elements), two keep 32-bit state; one bf16 group.
    shapes = [(64, 80), (4099,), (300,), (7, 9)]
    kwargs = {"lr": 1e-2, "momentum": 0.9} if cls_name == "SGD8bit" else {"lr": 1e-2}
    p0 = [torch.randn(s, generator=rng) for s in shapes] + [torch.randn(5000, generator=rng).bfloat16()]
    grads = [[torch.randn(p.shape, generator=rng).to(p.dtype) for p in p0] for _ in range(2)]

    def run(batched: bool):
        if batched:
            monkeypatch.setenv("TRITONBITS_BACKEND", "triton")  # Triton serves CPU tensors too (interpreter)
        else:  # the per-parameter ops (the PyTorch reference on CPU)
            monkeypatch.setattr(base, "_multi_tensor_kernels", lambda device: None)
        params = [torch.nn.Parameter(p.clone().to(device)) for p in p0]
        opt = getattr(optim, cls_name)([{"params": params[:4]}, {"params": params[4:]}], **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device)
            opt.step()
        monkeypatch.undo()
        return params, opt

    launches = []
    for kind in ("multi_tensor_update_8bit_blockwise", "multi_tensor_update_32bit"):
        original = getattr(kernels, kind)
        monkeypatch.setattr(kernels, kind, lambda *a, _f=original, _k=kind, **kw: (launches.append(_k), _f(*a, **kw)))
    ours, ours_opt = run(batched=True)
    # Per step: group 0 has one 8-bit and one 32-bit bucket, group 1 one 8-bit bucket.
    assert sorted(launches) == sorted(["multi_tensor_update_8bit_blockwise"] * 4 + ["multi_tensor_update_32bit"] * 2)
    ref, ref_opt = run(batched=False)
    for p, q in zip(ours, ref):
        # Two steps of the sqrt difference (module docstring), relative to the parameter scale.
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=torch.finfo(p.dtype).eps * 4, atol=1e-6)
        mine, theirs = ours_opt.state[p], ref_opt.state[q]
        assert mine["step"] == theirs["step"] == 2
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in theirs:
                # States of these rules do not read p (no coupled weight decay here) nor a sqrt:
                # exact, except rmsprop, whose p-independent state is exact too.
                assert torch.equal(mine[key].cpu(), theirs[key].cpu()), key


def _midpoint_block(qmap):
    """256 float32 values: 1.0 (so absmax is 1 and scaling is exact), then qmap's 255 midpoints."""
    sorted_map = qmap.float().sort().values
    return torch.cat([torch.ones(1), (sorted_map[:-1] + sorted_map[1:]) / 2])


def test_8bit_requantize_ties_and_sign_rules(launcher, reference, rng, device, qmaps):
    # Momentum's first step stores the gradient itself, so the gradient chooses what is quantized:
    # block 0: exact midpoints (ties go to the smaller entry); block 1: negative values that round
    # to the entry 0.0 must step to the first negative entry (-0.0 counts as negative).
    tiny = torch.tensor([1.0, -1e-9, 1e-9, -0.0, 0.0, -3e-7, 3e-7])
    g = torch.cat([_midpoint_block(qmaps[0]), tiny, torch.randn(100, generator=rng)])
    hyper = dict(HYPER, weight_decay=0.0, gnorm_scale=1.0)
    results = []
    for fn, dev in ((launcher, device), (reference, "cpu")):
        p = torch.ones_like(g).to(dev)
        s1 = torch.zeros(g.shape, dtype=torch.uint8, device=dev)
        a1 = torch.zeros(2, device=dev)
        _run_8bit(fn("optimizer_update_8bit_blockwise"), "momentum", g.to(dev), p, [s1, None, a1, None],
                  _clone(qmaps, dev), 1, hyper)  # fmt: skip
        results.append((s1.cpu(), a1.cpu()))
    (codes, absmax), (ref_codes, ref_absmax) = results
    assert torch.equal(absmax, ref_absmax) and torch.equal(codes, ref_codes)  # exact
    values = qmaps[0][ref_codes.long()]
    sorted_map = qmaps[0].sort().values
    assert torch.equal(values[1:256], sorted_map[:-1])  # every tie took the smaller entry
    # -1e-9 and -0.0 leave the entry 0.0 for the first negative one; 1e-9 and +0.0 may round to 0.0.
    assert values[257:261].tolist() == [sorted_map[126].item(), 0.0, sorted_map[126].item(), 0.0]


def test_8bit_second_moment_never_rounds_to_zero(launcher, reference, device, qmaps):
    # Adam's v = (1 - beta2) g**2: with one large gradient per block, tiny ones give v far below
    # the smallest positive entry times absmax; they must still get that entry, not 0.
    g = torch.tensor([1.0, 1e-6, -1e-6, 0.0, 3e-5] * 60)
    hyper = dict(HYPER, weight_decay=0.0, gnorm_scale=1.0)
    results = []
    for fn, dev in ((launcher, device), (reference, "cpu")):
        tensors = [torch.ones_like(g), torch.zeros(g.shape, dtype=torch.uint8), torch.zeros(g.shape, dtype=torch.uint8),
                   torch.zeros(2), torch.zeros(2)]  # fmt: skip
        p, s1, s2, a1, a2 = _clone(tensors, dev)
        _run_8bit(fn("optimizer_update_8bit_blockwise"), "adam", g.to(dev), p, [s1, s2, a1, a2], _clone(qmaps, dev), 1,
                  hyper)  # fmt: skip
        results.append([t.cpu() for t in (s1, s2, a1, a2)])
    for mine, theirs in zip(*results):
        assert torch.equal(mine, theirs)  # exact
    v = qmaps[1][results[1][1].long()]
    assert (v[1::5] > 0).all() and (v[3::5] == 0).all()  # tiny g: smallest positive entry; g == 0: zero


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process, for DTensor parameters."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_parameters_are_batched_through_their_shards(kernels, monkeypatch, rng, device, one_rank_group):
    """FSDP2's DTensor parameters join the multi-tensor launches through their local shards and
    end exactly where plain parameters given the same steps end."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import tritonbits.optim as optim

    monkeypatch.setenv("TRITONBITS_BACKEND", "triton")  # Triton serves CPU tensors too (interpreter)
    mesh = init_device_mesh(device, (1,))
    shapes = [(64, 80), (300,), (7, 9)]  # one 8-bit state, two 32-bit (under min_8bit_size)
    p0 = [torch.randn(s, generator=rng) for s in shapes]
    grads = [[torch.randn(s, generator=rng) for s in shapes] for _ in range(2)]
    launches = []
    for kind in ("multi_tensor_update_8bit_blockwise", "multi_tensor_update_32bit"):
        original = getattr(kernels, kind)
        monkeypatch.setattr(kernels, kind, lambda *a, _f=original, _k=kind, **kw: (launches.append(_k), _f(*a, **kw)))

    def run(as_dtensor: bool):
        wrap = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if as_dtensor else (lambda t: t)
        params = [torch.nn.Parameter(wrap(p.clone().to(device))) for p in p0]
        opt = optim.AdamW8bit(params, lr=1e-2)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = wrap(g.to(device))
            opt.step()
        return [p.detach().to_local() if as_dtensor else p.detach() for p in params]

    sharded = run(as_dtensor=True)
    assert sorted(launches) == sorted(["multi_tensor_update_8bit_blockwise", "multi_tensor_update_32bit"] * 2)
    for mine, plain in zip(sharded, run(as_dtensor=False)):
        assert torch.equal(mine, plain)
