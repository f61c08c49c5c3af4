"""Reference optimizer updates (one in-place step), 32-bit and 8-bit blockwise states, float32 math.

These are the update rules of bitsandbytes 0.50.2's CUDA kernels (``kOptimizer32bit{1,2}State``,
``kPreconditionOptimizer32bit{1,2}State``, ``kOptimizerStatic8bit{1,2}StateBlockwise``), written
element by element in PyTorch so that a fused Triton kernel can be checked against them. Every
op is in place: ``p``, the states, ``absmax*`` and ``unorm_vec`` are overwritten.

Notation: ``g`` is the gradient times ``gnorm_scale``; ``t`` the step (1-based);
``c1 = 1 - beta1**t``; ``c2 = sqrt(1 - beta2**t)``.

32-bit rules (float32 states shaped like ``p``; AdEMAMix's ``state1`` is ``[2, *p.shape]``):

==========  =====================================================================================
adam, lamb  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
            p = p + s * (-lr*c2/c1) * m / (sqrt(v) + eps*c2);  then p = p*(1 - lr*wd)
ademamix    m1 = b1*m1 + (1-b1)*g;  m2 = b3*m2 + (1-b3)*g;  v = b2*v + (1-b2)*g*g
            p = p - lr * (m1/c1 + alpha*m2) / (sqrt(v)/c2 + eps);  then p = p*(1 - lr*wd)
momentum,   g = g + wd*p;  m = g at t == 1, else b1*m + g;  p = p - s*lr*m
lars
rmsprop     g = g + wd*p;  v = b1*v + (1-b1)*g*g;  p = p - s*lr*g / (sqrt(v) + eps)
adagrad     g = g + wd*p;  v = v + g*g;  p = p - lr*g / (sqrt(v) + eps)
lion        p = p*(1 - lr*wd);  p = p - s*lr*sign(b1*m + (1-b1)*g);  m = b2*m + (1-b2)*g
==========  =====================================================================================

So weight decay is decoupled (a shrink of ``p``) for adam/lamb/ademamix/lion and coupled (added
to the gradient) for momentum/lars/rmsprop/adagrad. For adam/lamb/ademamix the shrink comes
*after* the update, as in the CUDA kernels (torch.optim.AdamW and bitsandbytes' CPU backend
shrink first; the two differ by ``lr * wd * update``).

``s`` is the trust ratio, 1 unless ``max_unorm > 0`` (LAMB, LARS). Then ``unorm_vec[0]`` holds
the squared norm of the update, computed from the pre-step states (for Lion, after the step, so
that the next step reads it), and ``s = limit / sqrt(unorm)`` when ``sqrt(unorm) > limit``, with
``limit = max_unorm * param_norm`` for 2-state rules and ``max_unorm * param_norm + eps`` for
1-state rules. Adagrad and AdEMAMix ignore ``s``. ``skip_zeros`` leaves the elements whose
(weight-decayed, for 1-state rules) gradient is exactly 0 untouched, for adam/lamb and the
1-state rules.

8-bit blockwise: each state is stored as uint8 codes into a 256-entry map (``qmap1``, the signed
dynamic map; ``qmap2``, the unsigned one, for the second moment) times one float32 ``absmax`` per
block of 256 elements. One step dequantizes, applies the rule above in float32 (no trust ratio;
lamb and lars have no 8-bit blockwise form), takes the new per-block absmax of each updated state,
and requantizes to the nearest code. A signed state that would change sign through rounding (a
tiny negative value rounding to the code 0.0) moves one code towards its sign, as the CUDA kernels
do. For adam/ademamix, elements with a non-finite gradient reset their states to 0 and keep ``p``.
AdEMAMix's ``state1`` is ``[2, *p.shape]`` codes and ``absmax1`` is ``[2, blocks]``.

Where this reference departs from the CUDA kernels, on purpose (their behaviour there is
incidental, and bitsandbytes' CPU/Triton backends agree with this file):

- 16-bit parameters are rounded once, at the end (CUDA rounds after the update and again after
  the weight-decay shrink; for Lion8bit it also rounds ``lr * sign`` to the gradient's dtype).
- 8-bit rmsprop/adagrad divide the weight-decayed, ``gnorm_scale``-d gradient (CUDA re-reads the
  raw gradient for the numerator of the parameter update).
- Skipped elements (``skip_zeros``) of a 1-state 8-bit rule keep their old state value (CUDA
  leaves the register uninitialized).
- Codes are always the nearest entry of the map (CUDA's ``quantize_2D`` search picks a neighbour
  of the nearest on rare values), and the second AdEMAMix momentum's absmax is row 1 of
  ``absmax1`` for every size (CUDA indexes ``absmax1[(n + i) / 256]``, the same only when
  ``n % 256 == 0``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._ops import register_reference
from .quant_blockwise import nearest_code, normalize_by_block, scale_by_block

BLOCKSIZE = 256  # elements per absmax block of every 8-bit optimizer state
TWO_STATE = ("adam", "lamb", "ademamix")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).float()


def _store(dst: Tensor, value: Tensor) -> None:
    """Write float32 ``value`` (flat) into ``dst`` (any layout), rounding to dst's dtype."""
    dst.copy_(value.view(dst.shape))


def _bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(1 - beta1**step, sqrt(1 - beta2**step))."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


# ---------------------------------------------------------------------------------------------
# 32-bit states


def _update_norm_squared(name, g, state1, state2, beta1, beta2, eps, step) -> Tensor:
    """Sum of squared update entries that the trust ratio compares to ``max_unorm * ||p||``.

    Computed from the states *before* this step (they are not written here) and the gradient
    without weight decay, as the CUDA "precondition" kernels do. AdEMAMix and Lion have no
    meaningful update norm there; the sums below are what those kernels accumulate.
    """
    if name in ("adam", "lamb"):
        m = (_flat(state1) * beta1 + (1.0 - beta1) * g) * (1.0 / (1.0 - beta1**step))
        v = (_flat(state2) * beta2 + (1.0 - beta2) * (g * g)) * (1.0 / (1.0 - beta2**step))
        update = m / (v.sqrt() + eps)
    elif name == "ademamix":
        return _flat(state1[0]).sum()
    elif name in ("momentum", "lars"):
        update = g if step == 1 else _flat(state1) * beta1 + g
    elif name == "lion":
        return (_flat(state1) * beta2 + (1.0 - beta2) * g).sum()
    elif name == "rmsprop":
        update = g / ((_flat(state1) * beta1 + (1.0 - beta1) * (g * g)).sqrt() + eps)
    else:  # adagrad
        update = g / ((_flat(state1) + g * g).sqrt() + eps)
    return (update * update).sum()


def _trust_ratio(name: str, unorm_vec: Optional[Tensor], max_unorm: float, param_norm: float, eps: float) -> Tensor:
    """Scale ``s`` (0-d float32) applied to the update when ``max_unorm > 0``, else 1."""
    one = torch.ones((), dtype=torch.float32)
    if max_unorm <= 0.0:
        return one
    unorm = unorm_vec.reshape(-1)[0].float().sqrt().cpu()
    limit = max_unorm * param_norm + (0.0 if name in TWO_STATE else eps)
    return torch.where(unorm > limit, limit / unorm, one)


@register_reference("optimizer_update_32bit")
@torch.no_grad()
def optimizer_update_32bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    unorm_vec: Optional[Tensor],
    max_unorm: float,
    param_norm: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    step: int,
    lr: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> None:
    """One step of ``optimizer_name`` with float32 states (see the module docstring for the rules).

    Args:
        g, p: gradient and parameter, same shape and float dtype (any layout).
        state1, state2: float32, shaped like p (ademamix: state1 is [2, *p.shape]); state2 only
            for adam, lamb and ademamix.
        unorm_vec: float32 [1], required when ``max_unorm > 0``; overwritten with the squared
            update norm.
        param_norm: ||p||_2 (float32), used only when ``max_unorm > 0``.
        step: 1-based step count.
    """
    name = optimizer_name
    if p.numel() == 0:
        return
    grad = _flat(g) * gnorm_scale
    param = _flat(p)
    wd = weight_decay

    if max_unorm > 0.0 and name != "lion":
        unorm_vec.fill_(_update_norm_squared(name, grad, state1, state2, beta1, beta2, eps, step))
    scale = _trust_ratio(name, unorm_vec, max_unorm, param_norm, eps).to(param.device)

    if name in ("adam", "lamb"):
        c1, c2 = _bias_corrections(beta1, beta2, step)
        m = _flat(state1) * beta1 + (1.0 - beta1) * grad
        v = _flat(state2) * beta2 + (1.0 - beta2) * (grad * grad)
        new_p = param + scale * (-lr * c2 / c1) * (m / (v.sqrt() + eps * c2))
        if wd > 0.0:
            new_p = new_p * (1.0 - lr * wd)
        keep = grad == 0 if skip_zeros else None
        _write(p, new_p, param, keep)
        _write(state1, m, _flat(state1), keep)
        _write(state2, v, _flat(state2), keep)
    elif name == "ademamix":
        c1, c2 = _bias_corrections(beta1, beta2, step)
        m1 = _flat(state1[0]) * beta1 + (1.0 - beta1) * grad
        m2 = _flat(state1[1]) * beta3 + (1.0 - beta3) * grad
        v = _flat(state2) * beta2 + (1.0 - beta2) * (grad * grad)
        new_p = param - lr * ((m1 / c1 + alpha * m2) / (v.sqrt() / c2 + eps))
        if wd > 0.0:
            new_p = new_p * (1.0 - lr * wd)
        _store(p, new_p)
        _store(state1, torch.cat([m1, m2]))
        _store(state2, v)
    else:
        s1 = _flat(state1)
        if name != "lion" and wd > 0.0:
            grad = grad + param * wd
        keep = grad == 0 if skip_zeros else None
        if name in ("momentum", "lars"):
            s1_new = grad if step == 1 else s1 * beta1 + grad
            new_p = param + scale * (-lr * s1_new)
        elif name == "rmsprop":
            s1_new = s1 * beta1 + (1.0 - beta1) * (grad * grad)
            new_p = param - scale * (lr * (grad / (s1_new.sqrt() + eps)))
        elif name == "adagrad":
            s1_new = s1 + grad * grad
            new_p = param - lr * (grad / (s1_new.sqrt() + eps))
        elif name == "lion":
            decayed = param * (1.0 - lr * wd) if wd > 0.0 else param
            new_p = decayed - scale * (lr * torch.sign(s1 * beta1 + (1.0 - beta1) * grad))
            s1_new = s1 * beta2 + (1.0 - beta2) * grad
        else:
            raise ValueError(f"optimizer_name {optimizer_name!r} has no 32-bit update rule")
        _write(p, new_p, param, keep)
        _write(state1, s1_new, s1, keep)
        if name == "lion" and max_unorm > 0.0:
            unorm_vec.fill_(_update_norm_squared(name, _flat(g) * gnorm_scale, state1, None, beta1, beta2, eps, step))


def _write(dst: Tensor, new: Tensor, old: Tensor, keep: Optional[Tensor]) -> None:
    """Store ``new`` into ``dst``, except where ``keep`` is True (there ``old`` stays)."""
    _store(dst, new if keep is None else torch.where(keep, old, new))


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise states


def _dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """uint8 codes (any shape) -> flat float32 ``qmap[code] * absmax[i // 256]``."""
    values = qmap.float()[codes.reshape(-1).long()]
    return scale_by_block(values, absmax.reshape(-1).float(), BLOCKSIZE)


def _requantize(values: Tensor, codes: Tensor, absmax: Tensor, qmap: Tensor, signed: bool) -> None:
    """Write flat float32 ``values`` into ``codes`` (uint8, in place) and ``absmax`` (per 256)."""
    scaled, new_absmax = normalize_by_block(values, BLOCKSIZE)
    qmap = qmap.float()
    index = nearest_code(scaled, qmap)
    if signed:
        # A negative value must not round to the code 0.0 (or a positive value to a negative
        # code): step one code towards the value's sign, as the CUDA kernels do. qmap is sorted.
        flipped = torch.signbit(qmap[index]) != torch.signbit(values)
        index = index + flipped.long() * torch.where(values > 0, 1, -1)
    else:
        # A positive second moment must not round to 0: Adam would divide by eps alone and take a
        # step of ~lr * m / eps. Round it up to the smallest positive code instead.
        index = index + ((values > 0) & (qmap[index] == 0)).long()
    codes.copy_(index.to(torch.uint8).view(codes.shape))
    absmax.copy_(new_absmax.view(absmax.shape))


@register_reference("optimizer_update_8bit_blockwise")
@torch.no_grad()
def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    weight_decay: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> None:
    """One step of ``optimizer_name`` with 8-bit blockwise states (see the module docstring).

    Args:
        g, p: gradient and parameter, same shape and float dtype.
        state1: uint8 codes shaped like p (ademamix: [2, *p.shape]) into ``qmap1`` (256 float32,
            sorted; the signed dynamic map), with float32 ``absmax1`` [ceil(n / 256)]
            (ademamix: [2, ceil(n / 256)]).
        state2, qmap2, absmax2: the second moment (adam, ademamix): uint8 codes into the unsigned
            map ``qmap2`` and float32 [ceil(n / 256)] absmax; None for 1-state rules.
        step: 1-based step count.
    """
    name = optimizer_name
    if p.numel() == 0:
        return
    device = p.device
    qmap1 = qmap1.to(device)
    raw = _flat(g)
    grad = raw * gnorm_scale
    param = _flat(p)
    wd = weight_decay

    if name in ("adam", "ademamix"):
        c1, c2 = _bias_corrections(beta1, beta2, step)
        qmap2 = qmap2.to(device)
        finite = torch.isfinite(grad)
        zero = torch.zeros((), device=device)
        v = _dequantize(state2, absmax2, qmap2)
        v = torch.where(finite, v * beta2 + (1.0 - beta2) * grad * grad, zero)
        if name == "adam":
            m = _dequantize(state1, absmax1, qmap1)
            m = torch.where(finite, m * beta1 + (1.0 - beta1) * grad, zero)
            new_p = param + (-lr * c2 / c1) * (m / (v.sqrt() + c2 * eps))
        else:
            m = _dequantize(state1[0], absmax1[0], qmap1)
            m2 = _dequantize(state1[1], absmax1[1], qmap1)
            m = torch.where(finite, m * beta1 + (1.0 - beta1) * grad, zero)
            m2 = torch.where(finite, m2 * beta3 + (1.0 - beta3) * grad, zero)
            new_p = param - lr * ((m / c1 + alpha * m2) / (v.sqrt() / c2 + eps))
        if wd > 0.0:
            new_p = new_p * (1.0 - lr * wd)
        _store(p, torch.where(finite, new_p, param))
        if name == "adam":
            _requantize(m, state1, absmax1, qmap1, signed=True)
        else:
            _requantize(m, state1[0], absmax1[0], qmap1, signed=True)
            _requantize(m2, state1[1], absmax1[1], qmap1, signed=True)
        _requantize(v, state2, absmax2, qmap2, signed=False)
        return

    s1 = _dequantize(state1, absmax1, qmap1)
    if wd > 0.0 and name != "lion":
        grad = grad + param * wd
    if name == "momentum":
        s1_new = grad if step == 1 else s1 * beta1 + grad
        new_p = param - lr * s1_new
    elif name == "rmsprop":
        s1_new = s1 * beta1 + (1.0 - beta1) * (grad * grad)
        new_p = param - lr * (grad / (s1_new.sqrt() + eps))
    elif name == "adagrad":
        s1_new = s1 + grad * grad
        new_p = param - lr * (grad / (s1_new.sqrt() + eps))
    elif name == "lion":
        decayed = param * (1.0 - lr * wd) if wd > 0.0 else param
        new_p = decayed - lr * torch.sign(s1 * beta1 + (1.0 - beta1) * grad)
        s1_new = s1 * beta2 + (1.0 - beta2) * grad
    else:
        raise ValueError(f"optimizer_name {optimizer_name!r} has no 8-bit blockwise update rule")
    # The skip test reads the raw gradient here (before weight decay), unlike the 32-bit rules.
    keep = raw == 0 if skip_zeros else None
    _write(p, new_p, param, keep)
    _requantize(s1_new if keep is None else torch.where(keep, s1, s1_new), state1, absmax1, qmap1, signed=True)
