"""AdEMAMix (Pagliardini et al., 2024): Adam plus a slow EMA of gradients mixed in with ``alpha``.

State: ``state1`` holds both first moments as ``[2, *p.shape]`` (fast m1 with beta1, slow m2 with
beta3), ``state2`` the second moment. ``t_alpha``/``t_beta3`` warm alpha and beta3 up over that
many steps. Weight decay is decoupled, applied after the update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Optional

import torch

from .optimizer import Optimizer2State, variant

__all__ = [
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
]  # fmt: skip


class AdEMAMix(Optimizer2State):
    """AdEMAMix with 32- or 8-bit state; see :class:`Optimizer2State` for the arguments."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: Optional[int] = None,
        t_beta3: Optional[int] = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: Literal[8, 32] = 32,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            "ademamix", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            optim_bits=optim_bits, args=None, min_8bit_size=min_8bit_size, is_paged=is_paged, alpha=alpha,
            t_alpha=t_alpha, t_beta3=t_beta3, percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


AdEMAMix8bit = variant(AdEMAMix, "AdEMAMix8bit", fixed={"optim_bits": 8}, drop=("optim_bits",))
AdEMAMix32bit = variant(AdEMAMix, "AdEMAMix32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))
PagedAdEMAMix = variant(AdEMAMix, "PagedAdEMAMix", fixed={"is_paged": True}, drop=("is_paged",))
PagedAdEMAMix8bit = variant(
    AdEMAMix, "PagedAdEMAMix8bit", fixed={"optim_bits": 8, "is_paged": True}, drop=("optim_bits", "is_paged")
)
PagedAdEMAMix32bit = variant(
    AdEMAMix, "PagedAdEMAMix32bit", fixed={"optim_bits": 32, "is_paged": True}, drop=("optim_bits", "is_paged")
)
