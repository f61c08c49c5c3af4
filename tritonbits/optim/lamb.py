"""LAMB: Adam's update scaled by a trust ratio, ``min(1, max_unorm * ||p|| / ||update||)``.

The trust ratio needs the norm of the whole update, which the blockwise 8-bit update does not
compute, so LAMB always keeps 32-bit state (``LAMB8bit`` warns once and does so too).
"""

from __future__ import annotations

from .optimizer import Optimizer2State, variant

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]


class LAMB(Optimizer2State):
    """LAMB; ``bias_correction``, ``amsgrad`` and ``adam_w_mode`` are accepted and unused, as in bitsandbytes."""

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adam_w_mode=True,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=1.0,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            "lamb", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size, max_unorm=max_unorm,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


LAMB8bit = variant(
    LAMB, "LAMB8bit", fixed={"optim_bits": 8}, drop=("optim_bits",), require={"amsgrad": False, "max_unorm": 1.0}
)
LAMB32bit = variant(LAMB, "LAMB32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))
