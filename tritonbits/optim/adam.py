"""Adam and AdamW (bitsandbytes' "adam" rule: decoupled weight decay, applied after the update).

``Adam`` and ``AdamW`` share the rule; they differ only in the default ``weight_decay`` (0 and
0.01). Unlike ``torch.optim.Adam``, bitsandbytes' Adam decays weights the AdamW way.
"""

from __future__ import annotations

import warnings

from .optimizer import Optimizer2State, variant

__all__ = [
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
]  # fmt: skip


def _warn_amsgrad(amsgrad):
    if amsgrad:
        warnings.warn("amsgrad=True is ignored, as in bitsandbytes: the update is plain Adam.", stacklevel=3)


class Adam(Optimizer2State):
    """Adam with 32- or 8-bit state (``optim_bits``); see :class:`Optimizer2State` for the arguments.

    ``amsgrad`` is accepted and ignored, as in bitsandbytes (a warning says so).
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        _warn_amsgrad(amsgrad)
        super().__init__(
            "adam", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            is_paged=is_paged, percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


class AdamW(Adam):
    """AdamW: :class:`Adam` with ``weight_decay=0.01`` by default."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


_8BIT = dict(fixed={"optim_bits": 8}, require={"amsgrad": False, "optim_bits": 32})

Adam8bit = variant(Adam, "Adam8bit", **_8BIT)
Adam32bit = variant(Adam, "Adam32bit", fixed={"optim_bits": 32})
PagedAdam = variant(Adam, "PagedAdam", fixed={"is_paged": True})
PagedAdam8bit = variant(Adam, "PagedAdam8bit", fixed={"optim_bits": 8, "is_paged": True}, require=_8BIT["require"])
PagedAdam32bit = variant(Adam, "PagedAdam32bit", fixed={"optim_bits": 32, "is_paged": True})

AdamW8bit = variant(AdamW, "AdamW8bit", **_8BIT)
AdamW32bit = variant(AdamW, "AdamW32bit", fixed={"optim_bits": 32})
PagedAdamW = variant(AdamW, "PagedAdamW", fixed={"is_paged": True}, drop=("is_paged",))
PagedAdamW8bit = variant(
    AdamW, "PagedAdamW8bit", fixed={"optim_bits": 8, "is_paged": True}, drop=("is_paged",), require=_8BIT["require"]
)
PagedAdamW32bit = variant(AdamW, "PagedAdamW32bit", fixed={"optim_bits": 32, "is_paged": True}, drop=("is_paged",))
