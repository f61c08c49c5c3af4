"""Reference 4-bit ops against float64 math and the format's definition."""

import pytest
import torch

from tritonbits._ops import BLOCKSIZES_4BIT, REFERENCES
from tritonbits.codebooks import get_4bit_type

quantize_4bit = REFERENCES["quantize_4bit"]
dequantize_4bit = REFERENCES["dequantize_4bit"]
gemv_4bit = REFERENCES["gemv_4bit"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("n", [1, 7, 300, 4097])
def test_codes_are_nearest_and_absmax_exact(rng, quant_type, dtype, blocksize, n):
    x = (torch.randn(n, generator=rng) * 3).to(dtype)
    packed, absmax = quantize_4bit(x, blocksize, quant_type, torch.uint8)
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    blocks = -(n // -blocksize)
    x64 = x.double()
    padded = torch.nn.functional.pad(x64, (0, blocks * blocksize - n))
    assert torch.equal(absmax.double(), padded.view(blocks, blocksize).abs().amax(1)), "absmax is the exact max |x|"

    table = get_4bit_type(quant_type).double()
    codes = unpack(packed, n)
    scaled = (x.float() * (1.0 / absmax).repeat_interleave(blocksize)[:n]).double()
    distance = (scaled[:, None] - table[None, :]).abs()
    chosen = distance.gather(1, codes[:, None]).squeeze(1)
    # The chosen code is a nearest table value. The decision thresholds are bitsandbytes' CUDA
    # constants, which sit up to 3e-7 off the exact midpoints, so "nearest" holds within 3e-7.
    assert torch.all(chosen <= distance.min(1).values + 3e-7)
    if quant_type == "fp4":
        # The sign bit follows the sign of x, also for values that round to zero.
        assert torch.equal(codes >= 8, x < 0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nibble_order_first_element_high(quant_type):
    table = get_4bit_type(quant_type)
    # One block: the largest positive, then the most negative value: codes argmax(table), argmin(table).
    x = torch.tensor([2.0, -2.0] + [0.5] * 62)
    packed, absmax = quantize_4bit(x, 64, quant_type, torch.uint8)
    assert absmax.tolist() == [2.0]
    assert packed[0, 0].item() == (int(table.argmax()) << 4) | int(table.argmin())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(1,), (5, 13), (64, 64), (3, 4097)])
def test_dequantize_is_table_times_absmax(rng, quant_type, dtype, blocksize, shape):
    n = 1
    for s in shape:
        n *= s
    blocks = -(n // -blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=rng, dtype=torch.uint8)
    absmax = torch.rand(blocks, generator=rng) * 10 + 0.1
    out = dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
    table = get_4bit_type(quant_type).double()
    expected = (table[unpack(packed, n)] * absmax.double().repeat_interleave(blocksize)[:n]).float().to(dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), expected), "float32 product, one rounding to the output dtype"


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
def test_quant_storage_reinterprets_bytes(rng, quant_storage):
    x = torch.randn(4, 64, generator=rng)
    as_bytes, absmax = quantize_4bit(x, 64, "nf4", torch.uint8)
    stored, absmax2 = quantize_4bit(x, 64, "nf4", quant_storage)
    assert stored.dtype == quant_storage and stored.shape == (128 // quant_storage.itemsize, 1)
    assert torch.equal(stored.view(torch.uint8).reshape(-1), as_bytes.reshape(-1))
    assert torch.equal(absmax, absmax2)
    back = dequantize_4bit(stored, absmax, 64, "nf4", [4, 64], torch.float32)
    assert torch.equal(back, dequantize_4bit(as_bytes, absmax, 64, "nf4", [4, 64], torch.float32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_bound(rng, quant_type):
    x = torch.randn(64 * 100, generator=rng)
    packed, absmax = quantize_4bit(x, 64, quant_type, torch.uint8)
    back = dequantize_4bit(packed, absmax, 64, quant_type, [x.numel()], torch.float32)
    table = get_4bit_type(quant_type).sort().values
    half_gap = ((table[1:] - table[:-1]).max() / 2).item()
    bound = absmax.repeat_interleave(64) * half_gap * (1 + 1e-6)  # half the widest gap, float32 slack
    assert torch.all((back - x).abs() <= bound)


def test_all_zero_block_decodes_to_zero():
    x = torch.zeros(128)
    x[64:] = torch.linspace(-1, 1, 64)
    for quant_type in ("nf4", "fp4"):
        packed, absmax = quantize_4bit(x, 64, quant_type, torch.uint8)
        assert absmax[0] == 0
        back = dequantize_4bit(packed, absmax, 64, quant_type, [128], torch.float32)
        assert torch.equal(back[:64], torch.zeros(64)) and not back.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_4bit_matches_float64(rng, dtype, quant_type):
    N, K = 33, 128
    w = torch.randn(N, K, generator=rng)
    packed, absmax = quantize_4bit(w, 64, quant_type, torch.uint8)
    a = torch.randn(3, K, generator=rng).to(dtype)
    out = gemv_4bit(a, packed, [N, K], absmax, get_4bit_type(quant_type), 64)
    w_dq = dequantize_4bit(packed, absmax, 64, quant_type, [N, K], dtype)
    expected = a.double() @ w_dq.double().t()
    assert out.shape == (3, N) and out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # product rounding in dtype
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_fp4_boundary_follows_cuda_constant():
    # 7/24 lies between FP4 levels 0.25 and 1/3. bitsandbytes' CUDA kernel compares with the
    # float32 constant 0.29166667f (= 0.29166665673...), so x / absmax = 0.29166668653 (the
    # float32 midpoint) takes the upper level, code 4. A recomputed float32 midpoint would give 7.
    scaled = torch.tensor(0.2916666865348816, dtype=torch.float32)
    x = torch.tensor([1.0, scaled.item()] + [0.0] * 62)
    packed, _ = quantize_4bit(x, 64, "fp4", torch.uint8)
    assert packed[0, 0].item() & 0xF == 4


def test_nf4_boundary_follows_cuda_constant():
    # A value exactly on a threshold takes the lower code (the kernels test x > t).
    t = torch.tensor(0.03979014977812767, dtype=torch.float32).item()
    x = torch.tensor([1.0, t, torch.nextafter(torch.tensor(t), torch.tensor(1.0)).item()] + [0.0] * 61)
    packed, _ = quantize_4bit(x, 64, "nf4", torch.uint8)
    assert packed[0, 0].item() & 0xF == 7 and packed[1, 0].item() >> 4 == 8
