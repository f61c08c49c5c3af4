"""Fused 4-bit gemv kernel against dequantize-then-matmul (the reference)."""

import pytest
import torch

import tritonbits.functional as F


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(48, 256), (33, 128)])
def test_matches_reference(device, launcher, reference, rng, dtype, rows, quant_type, shape):
    N, K = shape
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=dtype)
    args = (a, packed, [N, K], state.absmax, state.code, 64)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    assert out.shape == (rows, N) and out.dtype == dtype
    # Same decoded weight in dtype; sums differ only by float32 accumulation order and the final
    # rounding to dtype: within 2 ulps of dtype relative to the output scale.
    eps = torch.finfo(dtype).eps
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * eps * scale + 1e-5


def test_split_k_and_batch_dims(device, launcher, reference, rng):
    N, K = 16, 4096  # few rows of W and a long K: the launcher splits K across programs
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4", quant_storage=torch.bfloat16)
    a = torch.randn(2, 1, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    args = (a, packed, [N, K], state.absmax, state.code, 128)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    assert out.shape == (2, 1, N)
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())
