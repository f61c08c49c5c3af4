"""Adagrad (coupled weight decay; no learning-rate decay, zero initial accumulator)."""

from __future__ import annotations

from .optimizer import Optimizer1State, variant

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit"]


class Adagrad(Optimizer1State):
    """Adagrad: ``v += g*g``; ``p -= lr*g / (sqrt(v) + eps)``.

    ``lr_decay`` and ``initial_accumulator_value`` other than 0 raise ValueError, as in
    bitsandbytes.
    """

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if initial_accumulator_value != 0.0:
            raise ValueError("Initial accumulator value != 0.0 not supported!")
        if lr_decay != 0.0:
            raise ValueError("Lr Decay != 0.0 not supported!")
        super().__init__(
            "adagrad", params, lr, (0.0, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


# bitsandbytes' Adagrad8bit keeps optim_bits (default 8, only 8 allowed); Adagrad32bit ignores it.
Adagrad8bit = variant(Adagrad, "Adagrad8bit", defaults={"optim_bits": 8}, require={"optim_bits": 8})
Adagrad32bit = variant(Adagrad, "Adagrad32bit", fixed={"optim_bits": 32})
