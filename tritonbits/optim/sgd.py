"""SGD with momentum (bitsandbytes' "momentum" rule: coupled weight decay; no dampening/nesterov)."""

from __future__ import annotations

from .optimizer import Optimizer1State, variant

__all__ = ["SGD", "SGD8bit", "SGD32bit"]


class SGD(Optimizer1State):
    """SGD with momentum: ``m = g + wd*p`` at step 1, then ``m = momentum*m + g + wd*p``; ``p -= lr*m``.

    ``dampening`` and ``nesterov`` are accepted and unused, as in bitsandbytes; ``momentum=0``
    raises NotImplementedError.
    """

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
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        if momentum == 0:
            raise NotImplementedError("SGD without momentum is not supported!")
        super().__init__(
            "momentum", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


SGD8bit = variant(SGD, "SGD8bit", fixed={"optim_bits": 8}, drop=("optim_bits",))
SGD32bit = variant(SGD, "SGD32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))
