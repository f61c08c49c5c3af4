"""optim: one optimizer step over 16 float32 tensors of 4096x16384 (1.07B parameters).

(--quick: 2 tensors of 64x256.) Each case times ``optimizer.step()`` with fixed gradients, after
a warm-up step that creates the state. Implementations: tritonbits.optim.<Name>, bitsandbytes
.optim.<Name>, and where PyTorch has the same update, torch.optim (fused AdamW, foreach SGD).

Bytes counted per parameter (float32 param read + write, float32 grad read, each state read +
write, 8-bit states with one float32 absmax per 256 values): 8-bit Adam 16 + 16/256, 8-bit
Lion / SGD-momentum 14 + 8/256, 32-bit Adam 28, 32-bit SGD-momentum 20.

Checks, once per implementation on a separate 256x1024 tensor (64x128 with --quick): ``rel_err`` of the total update
after 3 steps against the same update rule in float32 PyTorch (``torch.optim`` or, for Lion, the
few lines below); ``state_bytes_per_param`` measured from the optimizer's state tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..harness import Case, Context, Timed, import_peer, rel_err, resolve
from . import register

ABSMAX_BLOCK = 256
CHECK_SHAPE = (256, 1024)
CHECK_SHAPE_QUICK = (64, 128)  # still above the 4096 elements below which 8-bit optimizers keep fp32 state
CHECK_STEPS = 3


def step_bytes(n_states: int, state_bits: int) -> float:
    """Bytes per parameter one step moves (see the module docstring)."""
    state = n_states * 2 * state_bits // 8
    absmax = n_states * 2 * 4 / ABSMAX_BLOCK if state_bits == 8 else 0
    return 4 * 2 + 4 + state + absmax


class _LionReference(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) in float32: p -= lr * sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


# name -> (kwargs shared by every implementation, float32 reference, states, torch.optim peer or None)
OPTIMIZERS: dict[str, tuple[dict, Callable, int, Callable | None]] = {
    "AdamW8bit": (
        {"lr": 1e-3, "weight_decay": 1e-2},
        lambda ps, kw: torch.optim.AdamW(ps, **kw),
        2,
        lambda ps, kw: torch.optim.AdamW(ps, fused=True, **kw),
    ),
    "PagedAdamW8bit": ({"lr": 1e-3, "weight_decay": 1e-2}, lambda ps, kw: torch.optim.AdamW(ps, **kw), 2, None),
    "AdamW": (
        {"lr": 1e-3, "weight_decay": 1e-2},
        lambda ps, kw: torch.optim.AdamW(ps, **kw),
        2,
        lambda ps, kw: torch.optim.AdamW(ps, fused=True, **kw),
    ),
    "Lion8bit": ({"lr": 1e-4, "weight_decay": 0.0}, lambda ps, kw: _LionReference(ps, **kw), 1, None),
    "SGD8bit": (
        {"lr": 1e-3, "momentum": 0.9},
        lambda ps, kw: torch.optim.SGD(ps, **kw),
        1,
        lambda ps, kw: torch.optim.SGD(ps, foreach=True, **kw),
    ),
}


def _optimizer_class(module: str, name: str):
    if module == "tritonbits":
        return resolve(f"tritonbits.optim.{name}")
    return getattr(import_peer(f"{module}.optim"), name)


def _state_bytes_per_param(optimizer, n_params: int) -> float:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total / n_params


def _update_error(build: Callable, name: str, device: torch.device, seed: int, shape) -> float:
    """rel_err of 3 steps of ``build`` against the float32 reference rule, on one tensor of ``shape``."""
    kwargs, reference, _, _ = OPTIMIZERS[name]
    gen = torch.Generator(device=device).manual_seed(seed)
    p0 = torch.randn(shape, generator=gen, device=device)
    grads = [torch.randn(shape, generator=gen, device=device) for _ in range(CHECK_STEPS)]
    results = []
    for make in (build, lambda ps: reference(ps, dict(kwargs))):
        p = torch.nn.Parameter(p0.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach() - p0)
    return rel_err(results[1], results[0])


def _make(module: str, name: str, n_params: int, check_shape):
    kwargs, _, n_states, torch_peer = OPTIMIZERS[name]
    state_bits = 32 if name in ("AdamW",) else 8

    def make(inputs) -> Timed:
        p0s, grads = inputs
        if module == "torch":
            build = lambda ps: torch_peer(ps, dict(kwargs))  # noqa: E731
            label, bits = f"torch.optim {name.removesuffix('8bit')} fp32", 32
        else:
            cls = _optimizer_class(module, name)
            build = lambda ps: cls(ps, **kwargs)  # noqa: E731
            label, bits = f"{module}.optim.{name}", state_bits
        params = [torch.nn.Parameter(p.clone()) for p in p0s]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = build(params)

        def check():
            return {
                "state_bytes_per_param": _state_bytes_per_param(optimizer, n_params),
                "rel_err": _update_error(build, name, p0s[0].device, 1234, check_shape),
            }

        return Timed(
            fn=optimizer.step,
            label=label,
            check=check,
            max_replicas=1,
            bytes=int(step_bytes(n_states, bits) * n_params),
        )

    return make


@register("optim")
def cases(ctx: Context) -> list[Case]:
    count, shape = (2, (64, 256)) if ctx.quick else (16, (4096, 16384))
    n_params = count * shape[0] * shape[1]
    size = f"{count}x{shape[0]}x{shape[1]}"
    out = []
    for name, (_, _, n_states, torch_peer) in OPTIMIZERS.items():
        case_id = f"optim.{name.lower()}.{size}.fp32"

        def setup(key=case_id):
            p0s = [ctx.randn(shape, torch.float32, f"{key}.p{i}") for i in range(count)]
            grads = [ctx.randn(shape, torch.float32, f"{key}.g{i}") * 1e-2 for i in range(count)]
            return p0s, grads

        check_shape = CHECK_SHAPE_QUICK if ctx.quick else CHECK_SHAPE
        impls = {module: _make(module, name, n_params, check_shape) for module in ("tritonbits", "bitsandbytes")}
        if torch_peer is not None:
            impls["torch"] = _make("torch", name, n_params, check_shape)
        out.append(
            Case(
                id=case_id,
                group="optim",
                title=f"{name} step {n_params / 1e9:.3g}B params",
                setup=setup,
                impls=impls,
                bytes=int(step_bytes(n_states, 32 if name == "AdamW" else 8) * n_params),
                # Issue 7: AdamW8bit at >= 75% of copy bandwidth (the others have ms targets on H100).
                target=0.75 if name == "AdamW8bit" else None,
                info={"params": n_params, "tensors": count, "shape": list(shape), "optimizer": name},
            )
        )
    return out
