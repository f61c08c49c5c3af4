"""The registry's direct path gives what the dispatcher gives, and steps aside when it must."""

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
