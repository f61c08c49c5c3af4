"""tritonbits.hf with transformers: TritonBitsConfig, the quantizer, save/reload, bitsandbytes compat.

A tiny Llama (hidden 64, 2 layers, vocab 128) is built from a config and saved to a temporary
folder; nothing is downloaded. Tolerances are stated next to each assert.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is needed (pip install tritonbits[hf])")
pytest.importorskip("accelerate", reason="accelerate is needed (pip install tritonbits[hf])")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is needed (tritonbits[hf])")

import tritonbits.hf as hf  # noqa: E402
from support import bnb_cpu_4bit_inexact  # noqa: E402
from tritonbits.nn import Linear4bit, Linear8bitLt  # noqa: E402

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.quantizers.auto import AutoQuantizationConfig  # noqa: E402

CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True),
    "int8": dict(load_in_8bit=True),
}
DTYPES = [torch.float32, torch.bfloat16]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict:
    """{dtype: folder} of one seeded tiny Llama saved with save_pretrained in float32 and bfloat16."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    folders = {}
    for dtype in DTYPES:
        folder = tmp_path_factory.mktemp(f"tiny-llama-{str(dtype).split('.')[-1]}")
        model.to(dtype).save_pretrained(folder)
        folders[dtype] = folder
    return folders


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def load(folder, dtype=None, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=dtype, **kwargs).eval()


@torch.no_grad()
def logits(model, input_ids) -> torch.Tensor:
    return model(input_ids).logits.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def quantized_layer_type(config: dict) -> type:
    return Linear4bit if config.get("load_in_4bit") else Linear8bitLt


# ---------------------------------------------------------------------------------------------
# the config


def test_import_tritonbits_does_not_import_transformers():
    code = (
        "import sys, tritonbits; tritonbits.quantize_model; import tritonbits.hf; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_has_bitsandbytes_config_fields_and_defaults():
    ours = inspect.signature(hf.TritonBitsConfig.__init__).parameters
    theirs = inspect.signature(BitsAndBytesConfig.__init__).parameters
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    ours_default, theirs_default = hf.TritonBitsConfig(), BitsAndBytesConfig()
    for name in list(theirs)[1:-1]:
        assert getattr(ours_default, name) == getattr(theirs_default, name), name
    assert ours_default.quant_method == "tritonbits"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_dict_round_trip_comes_back_as_tritonbits(name):
    config = hf.TritonBitsConfig(**CONFIGS[name], llm_int8_skip_modules=["mlp"], bnb_4bit_compute_dtype="bfloat16")
    serialized = json.loads(json.dumps(config.to_dict()))
    # transformers routes any dict with a true load_in_4bit/load_in_8bit to bitsandbytes
    assert "load_in_4bit" not in serialized and "load_in_8bit" not in serialized
    again = AutoQuantizationConfig.from_dict(serialized)
    assert type(again) is hf.TritonBitsConfig
    assert again.to_dict() == config.to_dict()
    assert again.bnb_4bit_compute_dtype == torch.bfloat16
    assert again.quantization_method() == {"nf4-dq": "nf4", "fp4": "fp4", "int8": "llm_int8"}[name]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), ValueError),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), ValueError),
        (dict(load_in_8bit=True, llm_int8_threshold="6"), TypeError),
        (dict(load_in_8bit=True, llm_int8_skip_modules="lm_head"), TypeError),
        (dict(load_in_4bit=True, bnb_4bit_quant_storage="int4"), ValueError),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype=3), TypeError),
        (dict(load_in_4bit=True, bits=4), TypeError),
    ],
)
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error):
        hf.TritonBitsConfig(**kwargs)


def test_mixed_device_map_needs_fp32_cpu_offload():
    quantizer = hf.TritonBitsHfQuantizer(hf.TritonBitsConfig(load_in_4bit=True), pre_quantized=False)
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        quantizer.validate_environment(device_map={"model": 0, "lm_head": "cpu"})
    allowed = hf.TritonBitsHfQuantizer(
        hf.TritonBitsConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True), pre_quantized=False
    )
    allowed.validate_environment(device_map={"model": 0, "lm_head": "cpu"})


# ---------------------------------------------------------------------------------------------
# from_pretrained with quantization


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_pretrained_quantizes_linear_layers(dense_dirs, input_ids, name, dtype):
    dense = load(dense_dirs[dtype], dtype)
    model = load(dense_dirs[dtype], dtype, quantization_config=hf.TritonBitsConfig(**CONFIGS[name]))
    layer_type = quantized_layer_type(CONFIGS[name])

    for layer in model.model.layers:
        for module_name in LINEAR_NAMES:
            parent = layer.self_attn if module_name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            assert type(getattr(parent, module_name)) is layer_type, module_name
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.dtype == dtype
    assert model.is_loaded_in_4bit == (layer_type is Linear4bit)
    assert model.is_loaded_in_8bit == (layer_type is Linear8bitLt)
    # 4-bit: 0.5 byte, 8-bit: 1 byte per linear weight; the embedding and lm_head stay dense
    assert model.get_memory_footprint() < 0.65 * dense.get_memory_footprint()

    actual, expected = logits(model, input_ids), logits(dense, input_ids)
    # quantization error of a random tiny model, measured 0.26-0.37 (4-bit), 0.03 (int8)
    assert relative_error(actual, expected) < (0.5 if layer_type is Linear4bit else 0.06)

    # the same network with each quantized layer replaced by its decoded weight computes the same
    # logits: the error above is the weights', not the layer's. 4-bit decodes before the matmul
    # (float rounding only); int8 also quantizes activations per row (about 1% of the logits' norm)
    decoded = load(dense_dirs[dtype], dtype, quantization_config=hf.TritonBitsConfig(**CONFIGS[name]))
    hf.dequantize_model(decoded)
    assert not any(isinstance(m, (Linear4bit, Linear8bitLt)) for m in decoded.modules())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] if layer_type is Linear4bit else 3e-2
    assert relative_error(logits(decoded, input_ids), actual) < tolerance


def test_skip_modules_stay_dense(dense_dirs):
    config = hf.TritonBitsConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "mlp"])
    model = load(dense_dirs[torch.float32], quantization_config=config)
    layer = model.model.layers[0]
    assert type(layer.mlp.up_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear
    assert type(layer.self_attn.q_proj) is Linear4bit


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_writes_bitsandbytes_layout_and_reloads_identically(dense_dirs, input_ids, tmp_path, name):
    config = hf.TritonBitsConfig(**CONFIGS[name])
    model = load(dense_dirs[torch.float32], quantization_config=config)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "tritonbits"
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    if config.load_in_4bit:
        quant_type = config.bnb_4bit_quant_type
        assert tensors[prefix + "weight"].dtype == torch.uint8
        assert tensors[prefix + "weight"].shape == (64 * 64 // 2, 1)
        for key in ("weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"):
            assert prefix + key in tensors, key
        assert (prefix + "weight.nested_absmax" in tensors) == config.bnb_4bit_use_double_quant
    else:
        assert tensors[prefix + "weight"].dtype == torch.int8
        assert tensors[prefix + "SCB"].dtype == torch.float32 and tensors[prefix + "SCB"].shape == (64,)
        assert int(tensors[prefix + "weight_format"]) == 0
    assert tensors["lm_head.weight"].dtype == torch.float32

    reloaded = load(tmp_path)  # no quantization_config: the saved one is used
    assert type(reloaded.model.layers[0].self_attn.q_proj) is quantized_layer_type(CONFIGS[name])
    # not re-quantized: the stored codes come back bit for bit, and so do the logits
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight.data, tensors[prefix + "weight"])
    assert torch.equal(logits(reloaded, input_ids), expected)


# ---------------------------------------------------------------------------------------------
# bitsandbytes compatibility


@pytest.fixture
def bnb_compat():
    hf.enable_bitsandbytes_compat()
    yield
    hf.disable_bitsandbytes_compat()


def hide_bitsandbytes(monkeypatch):
    """Make ``import bitsandbytes`` fail from here on, as if it were not installed."""
    for module in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


BNB_CONFIGS = {"nf4-dq": CONFIGS["nf4-dq"], "int8": CONFIGS["int8"]}


def save_bitsandbytes_checkpoint(folder, dense_folder, config: dict, input_ids):
    """A quant_method "bitsandbytes" checkpoint and its logits: written by the real bitsandbytes if
    it installs here (its CPU backend), otherwise by tritonbits serving BitsAndBytesConfig."""
    try:
        import bitsandbytes  # noqa: F401

        writer = "bitsandbytes"
    except ImportError:
        hf.enable_bitsandbytes_compat()
        writer = "tritonbits"
    try:
        model = load(dense_folder, torch.float32, quantization_config=BitsAndBytesConfig(**config))
        expected = logits(model, input_ids)
        model.save_pretrained(folder)
    finally:
        if writer == "tritonbits":
            hf.disable_bitsandbytes_compat()
    return expected, writer


@pytest.mark.parametrize("name", list(BNB_CONFIGS))
def test_bitsandbytes_checkpoint_loads_after_enable_compat(dense_dirs, input_ids, tmp_path, monkeypatch, name):
    expected, writer = save_bitsandbytes_checkpoint(tmp_path, dense_dirs[torch.float32], BNB_CONFIGS[name], input_ids)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"

    hide_bitsandbytes(monkeypatch)
    hf.enable_bitsandbytes_compat()
    try:
        model = load(tmp_path)
    finally:
        hf.disable_bitsandbytes_compat()
    layer_type = quantized_layer_type(BNB_CONFIGS[name])
    assert type(model.model.layers[1].mlp.down_proj) is layer_type
    assert isinstance(model.config.quantization_config, BitsAndBytesConfig)
    actual = logits(model, input_ids)
    if layer_type is Linear4bit:
        if writer == "bitsandbytes" and (why := bnb_cpu_4bit_inexact()):
            pytest.skip(why)
        # same codes, same decoding, float32 matmul: bitsandbytes' own CPU logits (measured: equal)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        # int8: one layer given the same input differs from bitsandbytes' CPU path by float
        # rounding only (6e-5 on outputs of size ~1); through 2 layers of a random model that
        # grows to a relative error of the logits of about 0.5% (measured)
        assert relative_error(actual, expected) < 2e-2


def test_bitsandbytes_config_quantizes_on_tritonbits_without_bitsandbytes(
    dense_dirs, input_ids, monkeypatch, bnb_compat
):
    hide_bitsandbytes(monkeypatch)
    model = load(dense_dirs[torch.float32], torch.float32, quantization_config=BitsAndBytesConfig(**CONFIGS["nf4-dq"]))
    assert type(model.model.layers[0].mlp.gate_proj) is Linear4bit
    assert type(model.lm_head) is nn.Linear
    config = hf.TritonBitsConfig(**CONFIGS["nf4-dq"])
    reference = load(dense_dirs[torch.float32], torch.float32, quantization_config=config)
    assert torch.equal(logits(model, input_ids), logits(reference, input_ids))


def test_disable_compat_restores_transformers_quantizers(bnb_compat):
    from transformers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is hf.BitsAndBytesCompatQuantizer
    hf.enable_bitsandbytes_compat()  # twice is harmless
    hf.disable_bitsandbytes_compat()
    assert auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"].__name__ == "Bnb4BitHfQuantizer"
    assert auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_8bit"].__name__ == "Bnb8BitHfQuantizer"


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(BNB_CONFIGS))
def test_load_and_generate_on_gpu(dense_dirs, input_ids, name):
    model = AutoModelForCausalLM.from_pretrained(
        dense_dirs[torch.bfloat16], dtype=torch.bfloat16, device_map="cuda",
        quantization_config=hf.TritonBitsConfig(**CONFIGS[name], bnb_4bit_compute_dtype=torch.bfloat16),
    )  # fmt: skip
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.device.type == "cuda"
    dense = load(dense_dirs[torch.bfloat16], torch.bfloat16).cuda()
    ids = input_ids.cuda()
    # measured on CPU: 0.26-0.37 (4-bit), 0.03 (int8)
    assert relative_error(logits(model, ids), logits(dense, ids)) < (0.5 if name != "int8" else 0.06)
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 16)
