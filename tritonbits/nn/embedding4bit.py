"""4-bit embedding tables: Embedding4bit and its NF4/FP4 shorthands EmbeddingNF4, EmbeddingFP4.

As in bitsandbytes, the table is quantized when the module is moved to a device (``.to``,
``.cuda()``, ``.cpu()``) or by :meth:`Embedding4bit.quantize_`. A lookup decodes only the rows it
reads when ``embedding_dim`` is a multiple of the blocksize (each row then owns whole blocks);
otherwise the whole table is decoded per call.

Unlike bitsandbytes 0.50.2, whose ``state_dict()`` raises ``NotImplementedError`` for this
module, the state dict is written in the Linear4bit format (``weight``, ``weight.absmax``, ...)
and loads back into a freshly built module.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import functional as F
from ..quant_state import QuantState
from .params4bit import Params4bit, load_prequantized_weight, quantized_weight, save_quant_state

__all__ = ["Embedding4bit", "EmbeddingFP4", "EmbeddingNF4"]


class Embedding4bit(nn.Embedding):
    """A lookup table [num_embeddings, embedding_dim] stored as 4-bit NF4/FP4 codes.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: columns; a multiple of the blocksize (64) gives the fast row-wise lookup.
        dtype: dtype of the dense table before quantization and of the output.
        quant_type: ``"fp4"`` (default) or ``"nf4"``.
        quant_storage: dtype of the words holding the packed codes (see Params4bit).
        device: where the dense table is first allocated.

    Input: integer indices of any shape. Output: [*input.shape, embedding_dim] in ``dtype``.
    The absmax scales are never double-quantized here (bitsandbytes' choice).
    """

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        dtype=None,
        quant_type="fp4",
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=None,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.quant_state = None
        if embedding_dim % self.weight.blocksize != 0:
            warnings.warn(
                f"Embedding4bit: embedding_dim {embedding_dim} is not a multiple of the blocksize "
                f"{self.weight.blocksize}, so every lookup decodes the whole table (slow).",
                stacklevel=2,
            )

    def quantize_(self) -> "Embedding4bit":
        """Quantize the table where it is (e.g. on the CPU); no-op if already quantized."""
        self.weight.quantize_()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_quant_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        state_dict, installed = load_prequantized_weight(self, state_dict, prefix)
        missing_before = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if installed and prefix + "weight" in missing_keys[missing_before:]:
            missing_keys.remove(prefix + "weight")

    def _lookup_rows(self, input: Tensor, weight: Params4bit) -> Tensor:
        """Gather the packed bytes and absmax of the rows asked for, and decode only those."""
        quant_state = weight.quant_state
        blocks_per_row = self.embedding_dim // quant_state.blocksize
        packed = weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        rows = torch.nn.functional.embedding(input, packed)
        absmax = torch.nn.functional.embedding(input, quant_state.absmax.view(self.num_embeddings, blocks_per_row))
        rows_state = QuantState(
            absmax=absmax.reshape(-1),
            shape=torch.Size((*input.shape, self.embedding_dim)),
            code=quant_state.code,
            blocksize=quant_state.blocksize,
            quant_type=quant_state.quant_type,
            dtype=quant_state.dtype,
        )
        return F.dequantize_4bit(rows.reshape(-1), rows_state)

    def forward(self, input: Tensor) -> Tensor:
        weight = quantized_weight(self)
        quant_state = weight.quant_state
        if self.embedding_dim % quant_state.blocksize == 0 and not quant_state.nested:
            return self._lookup_rows(input, weight).to(self.dtype)
        table = F.dequantize_4bit(weight.data.reshape(-1), quant_state)
        return torch.nn.functional.embedding(input, table).to(self.dtype)


class EmbeddingFP4(Embedding4bit):
    """Embedding4bit with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="fp4",
                         quant_storage=quant_storage, device=device)  # fmt: skip


class EmbeddingNF4(Embedding4bit):
    """Embedding4bit with ``quant_type="nf4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="nf4",
                         quant_storage=quant_storage, device=device)  # fmt: skip
