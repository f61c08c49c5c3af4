"""``Embedding8bit``: an embedding table stored as LLM.int8() rows (bitsandbytes' ``Embedding8bit``).

Each row of the table [num_embeddings, embedding_dim] is kept as int8 codes with one float32
absmax (``weight.SCB`` [num_embeddings]); a lookup returns ``codes * absmax / 127`` in the
table's original dtype. As in bitsandbytes, the table is quantized when moved to a device
(``.to(device)``, ``.cuda()``, ``.to("cpu")``) and saving is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear8bit import Int8Params

__all__ = ["Embedding8bit"]


class Embedding8bit(nn.Embedding):
    """Embedding lookup from an int8 table with per-row scales.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: width of each row.
        device, dtype: where and in which float dtype the table is first built; lookups return
            this dtype.

    Usage: load a float state dict, then move the module (``.to(device)``) to quantize it.
    Input: integer indices of any shape; output: ``[*input.shape, embedding_dim]``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise NotImplementedError("Saving Embedding8bit module is not implemented")

    def _apply(self, fn, *args, **kwargs):
        # Module.to replaces weight.data only; keep the scales (and CB) with the moved codes.
        super()._apply(fn, *args, **kwargs)
        scb = getattr(self.weight, "SCB", None)
        if scb is not None and self.weight.dtype == torch.int8:
            self.weight.CB = self.weight.data
            self.weight.SCB = scb.to(self.weight.device)
        return self

    def forward(self, input: Tensor) -> Tensor:
        rows = self.weight.data
        row_stats = getattr(self.weight, "SCB", None)
        if row_stats is None:
            raise RuntimeError("Embedding layer is not quantized. Please call .cuda() or .to(device) first.")
        if tuple(rows.shape) != (self.num_embeddings, self.embedding_dim):
            raise RuntimeError(
                f"quantized table has shape {tuple(rows.shape)}, expected ({self.num_embeddings}, {self.embedding_dim})"
            )
        if tuple(row_stats.shape) != (self.num_embeddings,):
            raise RuntimeError(f"weight.SCB has shape {tuple(row_stats.shape)}, expected ({self.num_embeddings},)")

        codes = F.embedding(input, rows)
        scales = F.embedding(input, row_stats.view(self.num_embeddings, 1))
        return (codes * (scales / 127.0)).to(self.dtype)
