"""``OutlierAwareLinear``: a base class for linear layers that quantize around outlier input features.

Subclasses implement two hooks; the layer supplies the outlier indices found by
:class:`tritonbits.utils.OutlierTracer` (run ``OutlierTracer.get_instance().initialize(model)``
and one forward pass first):

- ``quantize_weight(w, outlier_idx) -> Tensor``: the weight to keep, same shape as ``w``; called
  once, on the first forward, and copied into ``self.weight``;
- ``forward_with_outliers(x, outlier_idx) -> Tensor``: the layer's output.

``outlier_idx`` is an int64 tensor of input-feature indices, or None if the tracer has no record
for this weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..utils import OutlierTracer, logger

__all__ = ["OutlierAwareLinear"]


class OutlierAwareLinear(torch.nn.Linear):
    """``torch.nn.Linear`` (weight: (output_features, input_features)) with outlier-aware hooks."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.outlier_dim: Tensor | None = None
        self.is_quantized = False

    def forward_with_outliers(self, x: Tensor, outlier_idx: Tensor | None) -> Tensor:
        raise NotImplementedError("subclasses of OutlierAwareLinear implement forward_with_outliers(x, outlier_idx)")

    def quantize_weight(self, w: Tensor, outlier_idx: Tensor | None) -> Tensor:
        raise NotImplementedError("subclasses of OutlierAwareLinear implement quantize_weight(w, outlier_idx)")

    def forward(self, x: Tensor) -> Tensor:
        if self.outlier_dim is None:
            tracer = OutlierTracer.get_instance()
            if not tracer.is_initialized():
                logger.warning("OutlierAwareLinear: run OutlierTracer.get_instance().initialize(model) first")
            self.outlier_dim = tracer.get_outliers(self.weight)
        if not self.is_quantized:
            with torch.no_grad():
                self.weight.data.copy_(self.quantize_weight(self.weight, self.outlier_dim))
            self.is_quantized = True
        return self.forward_with_outliers(x, self.outlier_dim)
