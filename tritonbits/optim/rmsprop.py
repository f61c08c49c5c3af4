"""RMSprop (coupled weight decay; no momentum, not centered)."""

from __future__ import annotations

from .optimizer import Optimizer1State, variant

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit"]


class RMSprop(Optimizer1State):
    """RMSprop: ``v = alpha*v + (1-alpha)*g*g``; ``p -= lr*g / (sqrt(v) + eps)``.

    ``momentum`` is accepted and unused, as in bitsandbytes; ``alpha=0`` and ``centered=True``
    raise NotImplementedError.
    """

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha==0.0 is not supported!")
        if centered:
            raise NotImplementedError("Centered RMSprop is not supported!")
        super().__init__(
            "rmsprop", params, lr, (alpha, momentum), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


RMSprop8bit = variant(RMSprop, "RMSprop8bit", fixed={"optim_bits": 8}, drop=("optim_bits",))
RMSprop32bit = variant(RMSprop, "RMSprop32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))
