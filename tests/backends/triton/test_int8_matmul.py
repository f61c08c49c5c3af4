"""Triton int8 matmul kernels against the PyTorch reference.

``int8_linear_matmul`` must equal the reference exactly (int32). The dequantizing ops are checked
within one rounding of the output dtype of the float32 reference (see ``assert_one_rounding``).
Triton's interpreter runs int8 ``tl.dot`` with int32 accumulation exactly (numpy int32 matmul),
so the same kernels run here as on the GPU. Sizes are small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from tritonbits.backends.triton import int8_matmul

OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, K, N): one row (decode), rows < 16, a partial 16-row tile, more rows than one 64-row tile;
# K and N not multiples of the tiles or of 8, K = 32 (the smallest dot), K long enough to split.
SHAPES = [(1, 256, 48), (3, 100, 33), (16, 64, 16), (17, 96, 70), (70, 40, 130), (5, 2048, 24)]


def _int8(shape, rng, device, full_range=False):
    if full_range:  # every product is +-127 * 127: the largest sums the kernel must hold
        return ((torch.randint(0, 2, shape, generator=rng, dtype=torch.int8) * 2 - 1) * 127).to(device)
    return torch.randint(-127, 128, shape, generator=rng, dtype=torch.int8).to(device)


def _stats(n, rng, device):
    return (torch.rand(n, generator=rng) * 4 + 0.05).to(device)


def assert_one_rounding(out, expected):
    """|out - expected| <= eps(dtype) * |expected| + tiny: at most one rounding of the output dtype.

    The kernel computes the reference's float32 expression, but the compiler may contract the
    final multiply and add into an FMA; the float32 values then differ by about an ulp, which can
    flip the rounding to dtype by one step (one ulp of dtype is at most eps * |x|).
    """
    assert out.dtype == expected.dtype and out.shape == expected.shape
    finfo = torch.finfo(expected.dtype)
    diff = (out.float() - expected.float()).abs()
    assert bool((diff <= finfo.eps * expected.float().abs() + finfo.tiny).all()), diff.max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_matmul_exact(device, launcher, reference, rng, shape):
    M, K, N = shape
    A, B = _int8((M, K), rng, device), _int8((N, K), rng, device)
    out = launcher("int8_linear_matmul")(A, B)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out, reference("int8_linear_matmul")(A, B))  # exact


def test_linear_matmul_full_range_and_split_k(device, launcher, reference, rng):
    # K = 4096 at 2 rows splits K across programs: partial sums meet by int32 atomics, exactly.
    A, B = _int8((2, 4096), rng, device, full_range=True), _int8((24, 4096), rng, device, full_range=True)
    assert int8_matmul._config(2, 24, 4096, A.device)["SPLIT_K"] > 1  # the interpreter answers 132 SMs
    out = launcher("int8_linear_matmul")(A, B)
    expected = reference("int8_linear_matmul")(A, B)
    assert expected.abs().max().item() > 127 * 127 * 100  # sums far past int16: the int32 path is used
    assert torch.equal(out, expected)  # exact


def test_linear_matmul_batch_dims_and_strides(device, launcher, reference, rng):
    A = _int8((2, 3, 80), rng, device)[..., 8:72]  # 3-d, rows not contiguous (K = 64 of 80)
    B = _int8((64, 40), rng, device).t()  # [40, 64] seen through transposed strides
    out = launcher("int8_linear_matmul")(A, B)
    assert out.shape == (2, 3, 40) and out.is_contiguous()
    assert torch.equal(out, reference("int8_linear_matmul")(A, B))  # exact


@pytest.mark.parametrize("shape", [(0, 64, 16), (4, 64, 0), (4, 0, 16)], ids=str)
def test_empty(device, launcher, rng, shape):
    # Nothing to multiply: no rows, no columns, or K = 0 (every sum is 0, then only the bias).
    M, K, N = shape
    A, B = _int8((M, K), rng, device), _int8((N, K), rng, device)
    out = launcher("int8_linear_matmul")(A, B)
    assert out.dtype == torch.int32 and torch.equal(out, torch.zeros(M, N, dtype=torch.int32, device=device))
    row, col = _stats(M, rng, device), _stats(N, rng, device)
    bias = torch.randn(N, generator=rng).to(device)
    scaled = launcher("int8_scaled_mm")(A, B, row, col, bias)
    assert scaled.shape == (M, N) and scaled.dtype == torch.float16
    assert torch.equal(scaled, bias.half().expand(M, N))
    dequantized = launcher("int8_mm_dequant")(out, row, col, None, bias)
    assert dequantized.shape == (M, N) and torch.equal(dequantized, bias.half().expand(M, N))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scaled_mm(device, launcher, reference, rng, shape, dtype, with_bias):
    M, K, N = shape
    A, B = _int8((M, K), rng, device), _int8((N, K), rng, device)
    row, col = _stats(M, rng, device), _stats(N, rng, device)
    bias = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if with_bias else None
    out = launcher("int8_scaled_mm")(A, B, row, col, bias, dtype)
    assert_one_rounding(out, reference("int8_scaled_mm")(A, B, row, col, bias, dtype))


def test_scaled_mm_default_dtype_split_k_and_batch_dims(device, launcher, reference, rng):
    A, B = _int8((2, 1, 4096), rng, device), _int8((40, 4096), rng, device)
    assert int8_matmul._config(2, 40, 4096, A.device)["SPLIT_K"] > 1
    row, col = _stats(2, rng, device), _stats(40, rng, device)
    bias = torch.randn(40, generator=rng).to(device)  # float32 bias, float16 output
    out = launcher("int8_scaled_mm")(A, B, row, col, bias)
    assert out.shape == (2, 1, 40) and out.dtype == torch.float16
    assert_one_rounding(out, reference("int8_scaled_mm")(A, B, row, col, bias))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [None, *OUT_DTYPES], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 300), (33, 1000)], ids=str)
def test_mm_dequant(device, launcher, reference, rng, shape, dtype, with_bias):
    # int32 inputs up to 2**26: past 2**24 the conversion to float32 itself rounds, as in torch.
    A = torch.randint(-(2**26), 2**26, shape, generator=rng, dtype=torch.int32).to(device)
    rows, N = A.numel() // shape[-1], shape[-1]
    row, col = _stats(rows, rng, device), _stats(N, rng, device)
    bias = torch.randn(N, generator=rng).half().to(device) if with_bias else None
    out = launcher("int8_mm_dequant")(A, row, col, dtype, bias)
    assert out.shape == A.shape and out.dtype == (dtype or torch.float16)
    assert_one_rounding(out, reference("int8_mm_dequant")(A, row, col, dtype, bias))


def test_mm_dequant_non_contiguous(device, launcher, reference, rng):
    A = torch.randint(-(2**20), 2**20, (40, 30), generator=rng, dtype=torch.int32).to(device).t()  # [30, 40]
    row, col = _stats(30, rng, device), _stats(40, rng, device)
    out = launcher("int8_mm_dequant")(A, row, col, torch.bfloat16)
    assert out.is_contiguous()
    assert_one_rounding(out, reference("int8_mm_dequant")(A, row, col, torch.bfloat16))


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_stats_views_are_read_as_their_values(device, launcher, reference, rng, view):
    """Row and column stats given as strided or expanded (stride 0) views: the kernels read
    float32 stats as contiguous, so the launchers must copy such views (they read wrong values)."""
    M, K, N = 3, 70, 33
    A, B = _int8((M, K), rng, device), _int8((N, K), rng, device)
    if view == "strided":
        row, col = _stats(2 * M, rng, device)[::2], _stats(2 * N, rng, device)[::2]
    else:
        row, col = _stats(1, rng, device).expand(M), _stats(1, rng, device).expand(N)
    assert not (row.is_contiguous() or col.is_contiguous())
    out = launcher("int8_scaled_mm")(A, B, row, col, None, torch.float16)
    assert_one_rounding(out, reference("int8_scaled_mm")(A, B, row, col, None, torch.float16))
    acc = reference("int8_linear_matmul")(A, B)
    out = launcher("int8_mm_dequant")(acc, row, col, torch.float16, None)
    assert_one_rounding(out, reference("int8_mm_dequant")(acc, row, col, torch.float16, None))


def test_argument_errors(device, launcher, rng):
    A, B = _int8((4, 64), rng, device), _int8((8, 64), rng, device)
    row, col = _stats(4, rng, device), _stats(8, rng, device)
    with pytest.raises(ValueError, match="dtype must be float16, bfloat16 or float32"):
        launcher("int8_scaled_mm")(A, B, row, col, None, torch.int32)
    with pytest.raises(ValueError, match="col_stats must hold 8"):
        launcher("int8_scaled_mm")(A, B, row, col[:5])
    with pytest.raises(ValueError, match="bias must hold N = 8"):
        launcher("int8_scaled_mm")(A, B, row, col, torch.ones(3, device=device))


@pytest.mark.parametrize("M", [1, 16, 17, 64, 256, 4096])
def test_config_rule(M):
    # A fixed rule on M (no autotuning): tiles fit the rows, K-splits only where N gives too few
    # programs, and each split keeps several K tiles.
    config = int8_matmul._config(M, 4096, 4096, torch.device("cpu"))
    assert config["BLOCK_M"] == 16 if M <= int8_matmul.DECODE_ROWS else config["BLOCK_M"] >= 64
    assert 4096 // (config["BLOCK_K"] * config["SPLIT_K"]) >= 4
    wide = int8_matmul._config(M, 28672 * 4, 4096, torch.device("cpu"))
    assert wide["SPLIT_K"] == 1


def test_registered_for_the_ops():
    from tritonbits.backends.registry import TRITON_KERNELS

    for name in ("int8_linear_matmul", "int8_mm_dequant", "int8_scaled_mm"):
        assert TRITON_KERNELS[name] == "int8_matmul"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph capture needs a GPU")
def test_decode_path_replays_in_cuda_graph(launcher, rng):
    A, B = _int8((1, 4096), rng, "cuda"), _int8((4096, 4096), rng, "cuda")
    row, col = _stats(1, rng, "cuda"), _stats(4096, rng, "cuda")
    scaled = launcher("int8_scaled_mm")
    expected = scaled(A, B, row, col)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = scaled(A, B, row, col)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
