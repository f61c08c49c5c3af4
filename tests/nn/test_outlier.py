"""OutlierAwareLinear with OutlierTracer: the traced indices reach the subclass hooks."""

from __future__ import annotations

import pytest
import torch

from tritonbits.nn.outlier import OutlierAwareLinear
from tritonbits.utils import OutlierTracer


class _ZeroOutliers(OutlierAwareLinear):
    """Keeps the outlier input columns in full precision and rounds the rest to multiples of 1/4."""

    def quantize_weight(self, w, outlier_idx):
        q = torch.round(w * 4) / 4
        if outlier_idx is not None:
            q[:, outlier_idx] = w[:, outlier_idx]
        return q

    def forward_with_outliers(self, x, outlier_idx):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _model(rng, outlier_column):
    model = torch.nn.Sequential(_ZeroOutliers(16, 24), torch.nn.ReLU(), _ZeroOutliers(24, 8))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=rng) * 0.1)
        model[2].weight[:, outlier_column] *= 50  # one input feature of layer 2 with a far larger spread
    return model


def test_traced_outliers_reach_the_hooks(rng):
    model = _model(rng, outlier_column=5)
    original = model[2].weight.detach().clone()
    x = torch.randn(3, 16, generator=rng)
    x[:, 11] = 9.0  # above the magnitude threshold 6: an outlier feature of the first layer
    OutlierTracer.get_instance().initialize(model)
    model(x)  # trace
    out = model(x)  # second pass removes the hooks, quantizes and runs
    assert out.shape == (3, 8)
    assert 11 in model[0].outlier_dim.tolist()
    assert model[2].outlier_dim.tolist() == [5]
    assert model[0].is_quantized and model[2].is_quantized
    assert torch.equal(model[2].weight[:, 5], original[:, 5])  # outlier column kept exactly
    others = [c for c in range(24) if c != 5]
    assert torch.equal(model[2].weight[:, others], torch.round(original[:, others] * 4) / 4)
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_matches_bitsandbytes_tracer(rng, bnb_ref):
    model = _model(rng, outlier_column=17)
    x = torch.randn(4, 16, generator=rng) * 3
    ours, theirs = OutlierTracer.get_instance(), bnb_ref.utils.OutlierTracer.get_instance()
    for tracer in (ours, theirs):
        tracer.initialize(model)
        model[0].outlier_dim, model[2].outlier_dim = None, None
        model[0].is_quantized = model[2].is_quantized = True  # keep the weights: trace only
        model(x)
        model(x)
    for layer in (model[0], model[2]):
        mine, reference = ours.get_outliers(layer.weight), theirs.get_outliers(layer.weight)
        assert sorted(mine.tolist()) == sorted(reference.tolist())


def test_base_class_hooks_must_be_overridden(rng):
    layer = OutlierAwareLinear(4, 3)
    OutlierTracer.get_instance().initialize(torch.nn.Sequential())
    with pytest.raises(NotImplementedError, match="quantize_weight"):
        layer(torch.randn(2, 4, generator=rng))
