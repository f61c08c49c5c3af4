"""Reference optimizer updates vs bitsandbytes' own ops (CPU), float64 math and torch.optim."""

from __future__ import annotations

import math

import pytest
import torch

import tritonbits.functional as F
from tritonbits.backends.torch import optim as ref
from tritonbits.codebooks import create_dynamic_map

SHAPES = [(0,), (1,), (257,), (31, 33), (1024,)]
TWO_STATE = ("adam", "lamb", "ademamix")
# name -> (beta1, beta2, beta3, alpha, eps, lr); betas as the optimizer classes pass them.
HYPER = {
    "adam": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-3),
    "lamb": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-3),
    "ademamix": (0.9, 0.999, 0.9999, 5.0, 1e-8, 1e-3),
    "momentum": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2),
    "lars": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2),
    "rmsprop": (0.99, 0.0, 0.0, 0.0, 1e-8, 1e-2),
    "adagrad": (0.0, 0.0, 0.0, 0.0, 1e-10, 1e-2),
    "lion": (0.9, 0.99, 0.0, 0.0, 0.0, 1e-4),
}


def _states_32bit(name, shape, rng):
    """Seeded non-zero float32 states of a mid-training step (second moments positive)."""
    shape1 = (2, *shape) if name == "ademamix" else shape
    state1 = torch.randn(shape1, generator=rng) * 0.05
    if name in ("rmsprop", "adagrad"):
        state1 = state1.abs() + 1e-3
    state2 = torch.rand(shape, generator=rng) * 1e-2 + 1e-4 if name in TWO_STATE else None
    return state1, state2


def _step_32bit(module, name, g, p, state1, state2, unorm_vec, step, wd, max_unorm=0.0):
    beta1, beta2, beta3, alpha, eps, lr = HYPER[name]
    module.optimizer_update_32bit(
        name, g, p, state1, beta1, eps, step, lr, state2, beta2, beta3, alpha, wd, 1.0, unorm_vec, max_unorm=max_unorm
    )


@pytest.mark.parametrize("name", sorted(HYPER))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_32bit_matches_bitsandbytes(bnb_ref, rng, name, shape, wd):
    p = torch.randn(shape, generator=rng)
    g = torch.randn(shape, generator=rng) * 0.1
    state1, state2 = _states_32bit(name, shape, rng)
    ours = [t.clone() if t is not None else None for t in (p, state1, state2)]
    theirs = [t.clone() if t is not None else None for t in (p, state1, state2)]
    _step_32bit(F, name, g.clone(), *ours, None, 3, wd)
    _step_32bit(bnb_ref.functional, name, g.clone(), *theirs, None, 3, wd)
    # float32 rounding: both evaluate the same formulas in float32 in a different order (a few
    # ulp of |p| <= 5). bitsandbytes' CPU backend shrinks Adam/AdEMAMix weights before the update,
    # the CUDA kernels (and we) after: they differ by lr * wd * |update| <= 1e-3 * 0.1 * ~10.
    atol = 2e-6 + (1e-3 * wd * 10 if name in ("adam", "lamb", "ademamix") else 0.0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=atol)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-7)
    if state2 is not None:
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=1e-9)


def _adam_float64(p, g, m, v, step, lr, beta1, beta2, eps, wd, max_unorm, param_norm):
    """Adam/LAMB in float64 as the CUDA kernels define it (trust ratio from bias-corrected moments)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    unorm = ((m / c1) / ((v / (1 - beta2**step)).sqrt() + eps)).pow(2).sum()
    scale = 1.0
    if max_unorm > 0 and unorm.sqrt() > max_unorm * param_norm:
        scale = max_unorm * param_norm / unorm.sqrt()
    p = (p - scale * lr * c2 / c1 * m / (v.sqrt() + eps * c2)) * (1 - lr * wd)
    return p, m, v, unorm


@pytest.mark.parametrize("max_unorm", [0.0, 1e-3, 1.0])
def test_lamb_trust_ratio_float64(rng, max_unorm):
    shape = (300,)
    p = torch.randn(shape, generator=rng)
    g = torch.randn(shape, generator=rng)
    m, v = _states_32bit("adam", shape, rng)
    unorm_vec = torch.zeros(1)
    pp, mm, vv = p.clone(), m.clone(), v.clone()
    _step_32bit(F, "lamb", g, pp, mm, vv, unorm_vec, 4, 0.01, max_unorm=max_unorm)
    expect_p, expect_m, expect_v, expect_unorm = _adam_float64(
        p, g, m, v, 4, 1e-3, 0.9, 0.999, 1e-8, 0.01, max_unorm, torch.norm(p).item()
    )
    torch.testing.assert_close(pp.double(), expect_p, rtol=0, atol=1e-6)  # float32 p of |p| < 5
    torch.testing.assert_close(mm.double(), expect_m, rtol=1e-6, atol=1e-8)
    if max_unorm > 0:
        torch.testing.assert_close(unorm_vec.double()[0], expect_unorm, rtol=1e-4, atol=0)  # float32 sum


@pytest.mark.parametrize("name", ["momentum", "rmsprop", "lion"])
def test_1state_trust_ratio_float64(rng, name):
    # The 1-state bound is max_unorm * ||p|| + eps; Lion's norm is read from the previous step.
    p = torch.randn(500, generator=rng)
    g = torch.randn(500, generator=rng)
    state1, _ = _states_32bit(name, (500,), rng)
    beta1, beta2, _, _, eps, lr = HYPER[name]
    unorm_vec = torch.full((1,), 4.0) if name == "lion" else torch.zeros(1)
    pp, ss = p.clone(), state1.clone()
    _step_32bit(F, name, g, pp, ss, None, unorm_vec, 2, 0.0, max_unorm=0.01)
    limit = 0.01 * torch.norm(p.double()) + eps
    s, gd = state1.double(), g.double()
    if name == "momentum":
        new_s = beta1 * s + gd
        update, unorm = new_s, new_s.pow(2).sum()
    elif name == "rmsprop":
        new_s = beta1 * s + (1 - beta1) * gd * gd
        update = gd / (new_s.sqrt() + eps)
        unorm = update.pow(2).sum()
    else:
        update = torch.sign(beta1 * s + (1 - beta1) * gd)
        new_s = beta2 * s + (1 - beta2) * gd
        unorm = torch.tensor(4.0, dtype=torch.float64)
    scale = min(1.0, (limit / unorm.sqrt()).item())
    torch.testing.assert_close(pp.double(), p.double() - scale * lr * update, rtol=0, atol=2e-6)
    torch.testing.assert_close(ss.double(), new_s, rtol=1e-6, atol=1e-9)
    if name == "lion":  # recomputed for the next step from the new state (a plain sum)
        torch.testing.assert_close(unorm_vec.double()[0], (beta2 * new_s + (1 - beta2) * gd).sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["adam", "momentum", "rmsprop", "adagrad", "lion"])
def test_skip_zeros_leaves_elements(rng, name):
    p = torch.randn(64, generator=rng)
    g = torch.randn(64, generator=rng)
    g[::3] = 0.0
    state1, state2 = _states_32bit(name, (64,), rng)
    pp, s1 = p.clone(), state1.clone()
    s2 = state2.clone() if state2 is not None else None
    beta1, beta2, beta3, alpha, eps, lr = HYPER[name]
    F.optimizer_update_32bit(name, g, pp, s1, beta1, eps, 2, lr, s2, beta2, skip_zeros=True)
    assert torch.equal(pp[::3], p[::3]) and torch.equal(s1[::3], state1[::3])
    assert not torch.equal(pp[1::3], p[1::3])


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise


def _states_8bit(name, shape, rng):
    """Seeded 8-bit states: quantize non-zero float states with the optimizer maps."""
    signed, unsigned = create_dynamic_map(True), create_dynamic_map(False)
    state1, state2 = _states_32bit(name, shape, rng)
    rows = state1.reshape(2, -1) if name == "ademamix" else state1.reshape(1, -1)
    codes1, absmax1 = zip(*(F.quantize_blockwise(r.contiguous(), signed, blocksize=256) for r in rows))
    codes1 = torch.stack(codes1).reshape(state1.shape)
    absmax1 = torch.stack([q.absmax for q in absmax1])
    absmax1 = absmax1 if name == "ademamix" else absmax1[0]
    codes2 = absmax2 = None
    if state2 is not None:
        codes2, q2 = F.quantize_blockwise(state2, unsigned, blocksize=256)
        absmax2 = q2.absmax
    return [codes1, codes2, absmax1, absmax2], signed, unsigned


def _step_8bit(module, name, g, p, codes1, codes2, absmax1, absmax2, qmap1, qmap2, step, wd, skip_zeros=False):
    beta1, beta2, beta3, alpha, eps, lr = HYPER[name]
    module.optimizer_update_8bit_blockwise(
        name, g, p, codes1, codes2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1,
        qmap2 if codes2 is not None else None, absmax1, absmax2, wd, 1.0, skip_zeros,
    )  # fmt: skip


NAMES_8BIT = ("adam", "momentum", "rmsprop", "adagrad", "lion", "ademamix")


@pytest.mark.parametrize("name", NAMES_8BIT)
@pytest.mark.parametrize("shape", [(1,), (257,), (31, 33), (2048,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_8bit_matches_bitsandbytes(bnb_ref, rng, name, shape, dtype):
    p = torch.randn(shape, generator=rng).to(dtype)
    g = (torch.randn(shape, generator=rng) * 0.1).to(dtype)
    states, signed, unsigned = _states_8bit(name, shape, rng)
    ours = [p.clone()] + [t.clone() if t is not None else None for t in states]
    theirs = [p.clone()] + [t.clone() if t is not None else None for t in states]
    _step_8bit(F, name, g.clone(), *ours, signed, unsigned, 3, 0.0)
    _step_8bit(bnb_ref.functional, name, g.clone(), *theirs, signed, unsigned, 3, 0.0)

    # Same dequantized states in, same float32 math: p within rounding (float32: a few ulp;
    # bfloat16: one ulp of |p| < 8, 2**-5) and identical per-block absmax.
    atol = 2e-6 if dtype == torch.float32 else 2**-5
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), rtol=1e-6, atol=atol)
    for absmax_ours, absmax_theirs in ((ours[3], theirs[3]), (ours[4], theirs[4])):
        if absmax_ours is not None:
            torch.testing.assert_close(absmax_ours, absmax_theirs, rtol=1e-6, atol=0)
    # Codes: ours are the nearest code (plus the sign rule); bitsandbytes' CPU quantizer picks a
    # neighbour on ~0.1% (signed) / ~3% (unsigned map) of values. So: never farther than theirs,
    # and where both are exact nearest choices they agree.
    updated = _updated_float_states(name, p, g, states, signed, unsigned, step=3)
    for codes_ours, codes_theirs, absmax, values, qmap in (
        (ours[1], theirs[1], ours[3], updated[0], signed),
        (ours[2], theirs[2], ours[4], updated[1], unsigned),
    ):
        if codes_ours is None:
            continue
        scaled = ref.scale_by_block(values.reshape(-1), 1.0 / absmax.reshape(-1).clamp(min=1e-30), 256)
        if codes_ours.numel() != scaled.numel():  # ademamix: two rows, each its own blocks
            scaled = torch.cat([
                ref.scale_by_block(v.reshape(-1), 1.0 / a.clamp(min=1e-30), 256)
                for v, a in zip(values.reshape(2, -1), absmax.reshape(2, -1))
            ])  # fmt: skip
        d_ours = (scaled.double() - qmap.double()[codes_ours.reshape(-1).long()]).abs()
        d_theirs = (scaled.double() - qmap.double()[codes_theirs.reshape(-1).long()]).abs()
        moved = codes_ours.reshape(-1) != codes_theirs.reshape(-1)
        # The sign/zero rules may move a value 1 code off its nearest: only for |scaled| < 1e-5.
        tiny = scaled.abs() < 1e-5
        assert bool((d_ours[~tiny] <= d_theirs[~tiny] + 1e-7).all())
        assert moved.float().mean().item() <= 0.05


def _updated_float_states(name, p, g, states, signed, unsigned, step):
    """The float32 states after one step (weight decay 0), from the reference's own formulas."""
    codes1, codes2, absmax1, absmax2 = states
    beta1, beta2, beta3, _, _, _ = HYPER[name]
    grad = g.float().reshape(-1)
    if name == "ademamix":
        m1 = ref._dequantize(codes1[0], absmax1[0], signed) * beta1 + (1 - beta1) * grad
        m2 = ref._dequantize(codes1[1], absmax1[1], signed) * beta3 + (1 - beta3) * grad
        s1 = torch.cat([m1, m2])
    else:
        s1 = ref._dequantize(codes1, absmax1, signed)
        s1 = {
            "adam": lambda s: s * beta1 + (1 - beta1) * grad,
            "momentum": lambda s: s * beta1 + grad,
            "rmsprop": lambda s: s * beta1 + (1 - beta1) * grad * grad,
            "adagrad": lambda s: s + grad * grad,
            "lion": lambda s: s * beta2 + (1 - beta2) * grad,
        }[name](s1)
    s2 = None
    if codes2 is not None:
        s2 = ref._dequantize(codes2, absmax2, unsigned) * beta2 + (1 - beta2) * grad * grad
    return s1, s2


def test_8bit_second_moment_never_rounds_to_zero(rng):
    # A positive second moment far below its block's absmax must keep a positive code (else
    # Adam divides by eps and jumps); a tiny negative first moment keeps a negative code.
    shape = (256,)
    g = torch.randn(shape, generator=rng)
    g[7] = 1e-6
    g[9] = -1e-6
    states, signed, unsigned = _states_8bit("adam", shape, rng)
    codes1, codes2, absmax1, absmax2 = (torch.zeros_like(t) for t in states)
    p = torch.randn(shape, generator=rng)
    p0 = p.clone()
    _step_8bit(F, "adam", g, p, codes1, codes2, absmax1, absmax2, signed, unsigned, 1, 0.0)
    assert unsigned[codes2[7].long()] > 0 and unsigned[codes2[9].long()] > 0
    assert signed[codes1[9].long()] < 0
    assert (p - p0).abs().max().item() <= 1e-3 * 1.01  # first Adam step moves by at most ~lr


@pytest.mark.parametrize("name", ["adam", "lion", "momentum"])
def test_8bit_tracks_32bit_over_steps(rng, name):
    # Same gradients into the 8-bit and 32-bit updates; the parameters stay close (the 8-bit
    # state error is ~1% of the state; over 10 steps of size ~lr the gap stays below 10 * lr * 0.1).
    shape = (1024,)
    p32 = torch.randn(shape, generator=rng)
    p8 = p32.clone()
    s32 = [torch.zeros(shape), torch.zeros(shape) if name == "adam" else None]
    states, signed, unsigned = _states_8bit(name, shape, rng)
    states = [torch.zeros_like(t) if t is not None else None for t in states]
    for step in range(1, 11):
        g = torch.randn(shape, generator=rng)
        _step_32bit(F, name, g, p32, s32[0], s32[1], None, step, 0.0)
        _step_8bit(F, name, g, p8, *states, signed, unsigned, step, 0.0)
    lr = HYPER[name][5]
    assert (p8 - p32).abs().mean().item() < 10 * lr * 0.1


def test_empty_and_non_contiguous(rng):
    p = torch.empty(0)
    F.optimizer_update_32bit("adam", p.clone(), p, torch.empty(0), 0.9, 1e-8, 1, 1e-3, torch.empty(0), 0.999)
    base = torch.randn(16, 8, generator=rng)
    p_nc = base.t()  # non-contiguous view
    g = torch.randn(8, 16, generator=rng)
    expect = base.t().contiguous()
    s1, s2 = torch.zeros(8, 16), torch.zeros(8, 16)
    F.optimizer_update_32bit("adam", g, expect, s1.clone(), 0.9, 1e-8, 1, 1e-3, s2.clone(), 0.999)
    F.optimizer_update_32bit("adam", g, p_nc, s1, 0.9, 1e-8, 1, 1e-3, s2, 0.999)
    assert torch.equal(p_nc, expect)


def test_rejects_unknown_optimizer():
    p = torch.randn(4)
    with pytest.raises(ValueError, match="optimizer_name"):
        F.optimizer_update_32bit("adamax", p.clone(), p, torch.zeros(4), 0.9, 1e-8, 1, 1e-3)
    with pytest.raises(ValueError, match="optimizer_name"):
        F.optimizer_update_8bit_blockwise(
            "lamb", p.clone(), p, torch.zeros(4, dtype=torch.uint8), None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-3,
            create_dynamic_map(), None, torch.zeros(1), None,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# vs torch.optim, several steps


TORCH_CASES = {
    "adam": (lambda w: torch.optim.Adam(w, lr=1e-2), dict(beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-2, wd=0.0)),
    "adamw": (
        lambda w: torch.optim.AdamW(w, lr=1e-2, weight_decay=0.1),
        dict(beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-2, wd=0.1),
    ),
    "momentum": (lambda w: torch.optim.SGD(w, lr=1e-2, momentum=0.9), dict(beta1=0.9, eps=0.0, lr=1e-2, wd=0.0)),
    "rmsprop": (
        lambda w: torch.optim.RMSprop(w, lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.1),
        dict(beta1=0.99, eps=1e-8, lr=1e-3, wd=0.1),
    ),
    "adagrad": (
        lambda w: torch.optim.Adagrad(w, lr=1e-2, eps=1e-10, weight_decay=0.1),
        dict(beta1=0.0, eps=1e-10, lr=1e-2, wd=0.1),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_32bit_matches_torch_optim(rng, case):
    make, hp = TORCH_CASES[case]
    name = "adam" if case == "adamw" else case
    w = torch.nn.Parameter(torch.randn(200, generator=rng))
    p = w.detach().clone()
    opt = make([w])
    s1 = torch.zeros(200)
    s2 = torch.zeros(200) if name == "adam" else None
    for step in range(1, 6):
        g = torch.randn(200, generator=rng)
        w.grad = g.clone()
        opt.step()
        F.optimizer_update_32bit(
            name, g, p, s1, hp["beta1"], hp["eps"], step, hp["lr"], s2, hp.get("beta2", 0.0),
            weight_decay=hp["wd"],
        )  # fmt: skip
    # float32 rounding over 5 steps; AdamW also differs by the order of the shrink (lr*wd*|u|).
    atol = 1e-5 + (5 * hp["lr"] * hp["wd"] * hp["lr"] if case == "adamw" else 0.0)
    torch.testing.assert_close(p, w.detach(), rtol=1e-5, atol=atol)
