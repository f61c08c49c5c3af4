"""Lion (Chen et al., 2023): sign of an interpolated momentum; decoupled weight decay."""

from __future__ import annotations

from .optimizer import Optimizer1State, variant

__all__ = ["Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"]


class Lion(Optimizer1State):
    """Lion: ``p -= lr * sign(b1*m + (1-b1)*g)``, then ``m = b2*m + (1-b2)*g``; see Optimizer1State."""

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            "lion", params, lr, betas, 0.0, weight_decay, optim_bits, args, min_8bit_size,
            is_paged=is_paged, percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


Lion8bit = variant(Lion, "Lion8bit", fixed={"optim_bits": 8}, drop=("optim_bits",))
Lion32bit = variant(Lion, "Lion32bit", fixed={"optim_bits": 32}, drop=("optim_bits",))
PagedLion = variant(Lion, "PagedLion", fixed={"is_paged": True}, drop=("is_paged",))
PagedLion8bit = variant(Lion, "PagedLion8bit", fixed={"optim_bits": 8, "is_paged": True}, drop=("optim_bits", "is_paged"))
PagedLion32bit = variant(
    Lion, "PagedLion32bit", fixed={"optim_bits": 32, "is_paged": True}, drop=("optim_bits", "is_paged")
)
