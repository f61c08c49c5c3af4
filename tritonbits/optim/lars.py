"""LARS: SGD with momentum scaled by a trust ratio ``min(1, max_unorm * ||p|| / ||m||)``.

Like LAMB, LARS always keeps 32-bit state (the trust ratio needs whole-tensor norms).
``PytorchLARS`` is the plain-PyTorch version bitsandbytes ships for comparison.
"""

from __future__ import annotations

import torch

from .optimizer import Optimizer1State, variant

__all__ = ["LARS", "LARS8bit", "LARS32bit", "PytorchLARS"]


class LARS(Optimizer1State):
    """LARS; ``dampening`` and ``nesterov`` are accepted and unused; ``momentum=0`` raises."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.02,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        if momentum == 0:
            raise NotImplementedError("LARS without momentum is not supported!")
        super().__init__(
            "lars", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            max_unorm=max_unorm, percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


LARS8bit = variant(LARS, "LARS8bit", fixed={"optim_bits": 8}, drop=("optim_bits",))
LARS32bit = variant(LARS, "LARS32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))


class PytorchLARS(torch.optim.Optimizer):
    """LARS in plain PyTorch (float32 parameters): SGD momentum with ``torch.optim.SGD``'s
    dampening/nesterov, then the update scaled by ``min(1, max_unorm * ||p|| / ||update||)``."""

    def __init__(self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=False, max_unorm=0.02):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            max_unorm=max_unorm,
        )  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"] != 0:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                update = d_p
                if group["momentum"] != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d_p, alpha=1 - group["dampening"])
                    update = d_p + buf * group["momentum"] if group["nesterov"] else buf
                scale = 1.0
                if group["max_unorm"] > 0.0:
                    if p.dtype != torch.float32:
                        raise TypeError(f"PytorchLARS with max_unorm > 0 needs float32 parameters, got {p.dtype}")
                    pnorm, unorm = torch.norm(p), torch.norm(update)
                    if unorm > group["max_unorm"] * pnorm:
                        scale = (group["max_unorm"] * pnorm / unorm).item()
                p.add_(update, alpha=-group["lr"] * scale)
        return loss
