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


@pytest.mark.parametrize("rows", [1, 5])
def test_split_k_and_batch_dims(device, launcher, reference, rng, monkeypatch, rows):
    from tritonbits.backends.triton import gemv_4bit as kernels

    # small tiles, so that few rows of W and a long K make the launcher split K across programs
    monkeypatch.setattr(kernels, "CONFIGS", [(1, 1, 16, 128, 4, 1, False), (16, 16, 16, 128, 4, 1, True)])
    assert kernels._split_k(1, 4096, 128, torch.device(device)) > 1
    N, K = 16, 4096
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4", quant_storage=torch.bfloat16)
    a = torch.randn(rows, 1, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    args = (a, packed, [N, K], state.absmax, state.code, 128)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    assert out.shape == (rows, 1, N)
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("blocksize, shape", [(32, (20, 96)), (256, (40, 512)), (4096, (8, 4096))])
def test_block_sizes_and_row_counts(device, launcher, reference, rng, rows, blocksize, shape):
    N, K = shape
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=torch.bfloat16)
    args = (a, packed, [N, K], state.absmax, state.code, blocksize)
    out = launcher("gemv_4bit")(*args)
    expected = reference("gemv_4bit")(*args)
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nested_absmax_decoded_in_kernel(device, launcher, reference, rng, rows, dtype):
    N, K = 24, 768
    w = torch.randn(N, K, generator=rng).to(device)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    a = torch.randn(rows, K, generator=rng).to(device=device, dtype=dtype)
    inner = state.state2
    args = (a, packed, [N, K], state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize, state.code, 64)
    out = launcher("gemv_4bit_nested")(*args)
    expected = reference("gemv_4bit_nested")(*args)
    # the reference decodes the absmax as functional.dequantize_4bit does
    dense = F.dequantize_4bit(packed, state).to(dtype)
    assert torch.equal(expected, torch.nn.functional.linear(a, dense))
    scale = expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * scale + 1e-5
