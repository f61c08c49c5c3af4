"""Full-precision embeddings whose weight keeps 32-bit optimizer state: ``Embedding``, ``StableEmbedding``.

Embedding rows see sparse, bursty gradients, which 8-bit optimizer state quantizes badly. Both
layers register ``{"optim_bits": 32}`` for their ``weight`` with
:class:`tritonbits.optim.GlobalOptimManager`, so an 8-bit optimizer (``Adam8bit``...) keeps 32-bit
state for that one parameter, exactly as bitsandbytes does. ``StableEmbedding`` also normalizes its
output with a LayerNorm computed in the default float dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..optim.optimizer import GlobalOptimManager

__all__ = ["Embedding", "StableEmbedding"]


class _Embedding32bitState(torch.nn.Embedding):
    """``nn.Embedding`` with Xavier-uniform init and a 32-bit optimizer-state override for ``weight``."""

    def _register_32bit_state(self) -> None:
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def _lookup(self, input: Tensor) -> Tensor:
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class StableEmbedding(_Embedding32bitState):
    """Embedding followed by LayerNorm, for stable training with 8-bit optimizers.

    Args are ``torch.nn.Embedding``'s. ``weight``: (num_embeddings, embedding_dim), Xavier-uniform
    initialized (the ``padding_idx`` row zero). ``forward(input)``: int64 indices of any shape ->
    (*input.shape, embedding_dim) in ``weight``'s dtype; the lookup is cast to
    ``torch.get_default_dtype()`` for the LayerNorm (``self.norm``), then back.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
            dtype=dtype,
        )
        # The norm's parameters stay in the default dtype: the normalization runs in full precision.
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        self._register_32bit_state()

    def forward(self, input: Tensor) -> Tensor:
        emb = self._lookup(input).to(torch.get_default_dtype())
        return self.norm(emb).to(self.weight.dtype)


class Embedding(_Embedding32bitState):
    """``torch.nn.Embedding`` whose weight keeps 32-bit optimizer state under 8-bit optimizers.

    Args are ``torch.nn.Embedding``'s (no ``dtype``, as in bitsandbytes). ``weight``:
    (num_embeddings, embedding_dim), Xavier-uniform initialized. ``forward(input)``: int64 indices
    of any shape -> (*input.shape, embedding_dim) in ``weight``'s dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
        )
        self._register_32bit_state()

    def forward(self, input: Tensor) -> Tensor:
        return self._lookup(input)
