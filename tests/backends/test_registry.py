"""The registry's direct path gives what the dispatcher gives, and steps aside when it must."""

import pytest
import torch

import tritonbits.functional as F
from tritonbits._ops import REFERENCES
from tritonbits.backends import registry
from support import OpRecorder


def test_direct_kernel_is_the_dispatchers_choice():
    served = {(name, dev) for (name, dev) in registry._REGISTERED}
    for name in REFERENCES:
        for device_type in ("cpu", "cuda"):
            expected = registry._REGISTERED.get((name, device_type)) if (name, device_type) in served else REFERENCES[name]
            assert registry.direct_kernel(name, device_type) is expected


def test_direct_and_dispatched_results_agree(rng):
    x = torch.randn(40, 64, generator=rng)
    packed, state = F.quantize_4bit(x, quant_type="nf4")
    direct = F.dequantize_4bit(packed, state)
    dispatched = torch.ops.tritonbits.dequantize_4bit(packed, state.absmax, 64, "nf4", [40, 64], torch.float32)
    assert torch.equal(direct, dispatched)


def test_dispatch_modes_still_see_the_ops(rng):
    # Fake tensors, tracers and recorders work through dispatch modes: the direct path steps aside.
    x = torch.randn(8, 64, generator=rng)
    with OpRecorder() as recorder:
        F.quantize_4bit(x, quant_type="nf4")
    assert "tritonbits.quantize_4bit.default" in recorder.names


def test_old_gpus_get_the_reference(monkeypatch):
    # A GPU below Triton's minimum compute capability: auto mode warns once and runs the reference.
    monkeypatch.setattr(registry, "_TRITON_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (6, 1))
    monkeypatch.setattr(registry, "load_triton_launcher", lambda name: pytest.fail("Triton must not be loaded"))
    kernel = registry._lazy_kernel("int8_vectorwise_dequant", strict=False)
    a = torch.randint(-127, 128, (2, 8), dtype=torch.int8)
    stats = torch.rand(2)
    fake_cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="compute capability 6.1"):
        assert registry.triton_serves(fake_cuda) is False
    assert registry.triton_serves(fake_cuda) is False  # cached: no second warning, no query
    assert registry.triton_serves(torch.device("cpu")) is True
    # The kernel decides by the first tensor's device; a CPU tensor stands in for the data here.
    monkeypatch.setattr(registry, "_first_device", lambda args: fake_cuda)
    assert torch.equal(kernel(a, stats), REFERENCES["int8_vectorwise_dequant"](a, stats))
