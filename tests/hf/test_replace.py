"""tritonbits.quantize_model / dequantize_model on plain PyTorch models (no transformers needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tritonbits
from tritonbits import functional as F
from tritonbits.hf.replace import QuantizeSettings, dequantize_model, quantize_model, should_convert
from tritonbits.nn import Linear4bit, Linear8bitLt

SETTINGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


class TinyNet(nn.Module):
    """Odd widths (not multiples of the 64-element block) and a head that must stay dense."""

    def __init__(self, width: int, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        hidden = 2 * width + 1
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width, bias=False))
        self.lm_head = nn.Linear(width, 7)
        for p in self.parameters():
            p.data = (torch.randn(p.shape, generator=generator) * 0.2).to(dtype)

    def forward(self, x):
        return self.lm_head(self.body(x))


def test_quantize_model_is_a_lazy_top_level_attribute():
    assert tritonbits.quantize_model is quantize_model


@pytest.mark.parametrize("width", [33, 95])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_quantize_model_replaces_linears_and_keeps_outputs(rng, name, dtype, width):
    model = TinyNet(width, dtype, rng)
    x = torch.randn(3, 5, width, generator=rng).to(dtype)
    with torch.no_grad():
        expected = model(x).float()
    dense_weights = [model.body[0].weight.detach().clone(), model.body[2].weight.detach().clone()]

    assert quantize_model(model, SETTINGS[name], progress=False) is model
    layer_type = Linear8bitLt if name == "int8" else Linear4bit
    assert type(model.body[0]) is layer_type and type(model.body[2]) is layer_type
    assert type(model.lm_head) is nn.Linear  # the default skip list
    assert model.body[2].bias is None
    with torch.no_grad():
        actual = model(x).float()
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    relative = ((actual - expected).norm() / expected.norm()).item()
    # 4-bit weights carry ~10% relative error each, int8 ~1% (plus bfloat16 rounding)
    assert relative < (0.25 if layer_type is Linear4bit else 0.04), relative

    # the codes are those the functional API gives for the same weight
    if layer_type is Linear4bit:
        settings = QuantizeSettings.from_config(SETTINGS[name])
        packed, _ = F.quantize_4bit(
            dense_weights[0],
            quant_type=settings.bnb_4bit_quant_type,
            compress_statistics=settings.bnb_4bit_use_double_quant,
        )
        assert torch.equal(model.body[0].weight.data, packed)
    else:
        codes, _, _ = F.int8_vectorwise_quant(dense_weights[0].to(torch.float16))
        assert torch.equal(model.body[0].weight.data, codes)


def test_quantize_model_accepts_a_config_object_skip_list_and_shows_progress(rng, capsys):
    transformers = pytest.importorskip("transformers", reason="config objects come from tritonbits.hf / transformers")
    from tritonbits.hf import TritonBitsConfig

    model = TinyNet(40, torch.float32, rng)
    config = TritonBitsConfig(load_in_4bit=True, llm_int8_skip_modules=["body.2"])
    quantize_model(model, config)
    assert type(model.body[0]) is Linear4bit
    assert type(model.body[2]) is nn.Linear  # skipped by the config
    # as in transformers, a given skip list replaces the default ["lm_head"]
    assert type(model.lm_head) is Linear4bit
    assert "Quantizing" in capsys.readouterr().err  # the tqdm bar

    other = TinyNet(40, torch.float32, rng)
    quantize_model(other, transformers.BitsAndBytesConfig(load_in_8bit=True), modules_to_not_convert=[], progress=False)
    assert type(other.lm_head) is Linear8bitLt  # an explicit empty skip list quantizes everything


def test_quantize_model_rejects_bad_settings(rng):
    with pytest.raises(ValueError, match="load_in_4bit"):
        quantize_model(TinyNet(8, torch.float32, rng), {})
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        quantize_model(TinyNet(8, torch.float32, rng), load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(TypeError, match="blocksize"):
        quantize_model(TinyNet(8, torch.float32, rng), load_in_4bit=True, blocksize=64)
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="meta"):
        quantize_model(empty, load_in_4bit=True, progress=False)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_dequantize_model_gives_dense_layers_with_the_decoded_weights(rng, name):
    model = quantize_model(TinyNet(48, torch.float32, rng), SETTINGS[name], progress=False)
    x = torch.randn(4, 48, generator=rng)
    with torch.no_grad():
        quantized = model(x)
    dequantize_model(model)
    assert all(type(m) is nn.Linear for m in (model.body[0], model.body[2], model.lm_head))
    assert model.body[0].weight.dtype == torch.float32
    assert not model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    with torch.no_grad():
        dense = model(x)
    relative = ((dense - quantized).norm() / quantized.norm()).item()
    # 4-bit: the layer decodes the same weight before its matmul (float32 rounding only);
    # int8 also rounds activations to int8 per row (about 1%)
    assert relative < (1e-5 if name != "int8" else 3e-2), relative


def test_should_convert_matches_names_suffixes_and_parents():
    assert not should_convert("lm_head", ["lm_head"])
    assert not should_convert("model.layers.0.mlp.up_proj", ["mlp"])
    assert not should_convert("model.layers.0.mlp.up_proj", ["up_proj"])
    assert not should_convert("model.layers.0.mlp", ["model.layers.0"])
    assert should_convert("model.layers.0.mlp.up_proj", ["lm_head", "down_proj"])
    assert should_convert("model.layers.10.mlp", ["model.layers.1"])
    assert should_convert("anything", None)


def test_quantize_model_frees_each_dense_layer_as_it_goes(monkeypatch):
    """Peak memory is one dense layer plus the quantized model: no replaced nn.Linear outlives its turn."""
    import gc
    import weakref

    from tritonbits.hf import replace

    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    originals = [weakref.ref(layer) for layer in model]
    alive_during = []
    real = replace.quantize_linear

    def watching(linear, settings, device):
        gc.collect()
        alive_during.append(sum(ref() is not None for ref in originals))
        return real(linear, settings, device)

    monkeypatch.setattr(replace, "quantize_linear", watching)
    replace.quantize_model(model, load_in_4bit=True, modules_to_not_convert=[], progress=False)
    # while layer i is quantized, layers 0..i-1 are gone: only the current one and those after it live
    assert alive_during == [4, 3, 2, 1]
