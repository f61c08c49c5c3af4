"""matmul_4bit and MatMul4Bit: shapes, dtypes, op routing, out=, errors, QLoRA backward."""

from __future__ import annotations

import pytest
import torch

from tritonbits import functional as F
from tritonbits.autograd import MatMul4Bit, matmul_4bit
from support import EPS, OpRecorder, assert_close_to

FLOATS = [torch.float16, torch.bfloat16, torch.float32]


def quantized_weight(rng, n, k, device, quant_type="nf4", compress_statistics=False, quant_storage=torch.uint8):
    weight = (torch.randn(n, k, generator=rng) * 0.1).to(device)
    return F.quantize_4bit(weight, quant_type=quant_type, compress_statistics=compress_statistics,
                           quant_storage=quant_storage)  # fmt: skip


def decoded64(B, state, dtype):
    """W [N, K] decoded by the functional API, rounded once to dtype, as float64."""
    return F.dequantize_4bit(B, state).float().to(dtype).double()






@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch_shape", [(1,), (7,), (2, 3)], ids=["1row", "7rows", "2x3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_float64_reference(rng, device, dtype, compress_statistics, quant_storage, batch_shape, bias):
    B, state = quantized_weight(rng, 48, 96, device, compress_statistics=compress_statistics,
                                quant_storage=quant_storage)  # fmt: skip
    A = torch.randn(*batch_shape, 96, generator=rng).to(device, dtype)
    b = torch.randn(48, generator=rng).to(device, dtype) if bias else None
    out = matmul_4bit(A, B, state, bias=b)
    assert out.shape == (*batch_shape, 48) and out.dtype == dtype
    W = decoded64(B, state, dtype)
    expected, magnitude = A.double() @ W.T, A.double().abs() @ W.abs().T
    if bias:
        expected, magnitude = expected + b.double(), magnitude + b.double().abs()
    assert_close_to(out, expected, dtype, magnitude, k=96)


@pytest.mark.parametrize("features", [(17, 33), (5, 7)], ids=["17x33", "5x7"])
def test_odd_shapes(rng, device, features):
    n, k = features
    B, state = quantized_weight(rng, n, k, device, quant_type="fp4")
    for batch_shape in [(1,), (4,), (2, 2)]:
        A = torch.randn(*batch_shape, k, generator=rng).to(device)
        W = decoded64(B, state, torch.float32)
        assert_close_to(matmul_4bit(A, B, state), A.double() @ W.T, torch.float32, A.double().abs() @ W.abs().T, k)


def test_routes_small_batches_to_gemv_and_large_ones_to_dequantize(rng):
    from tritonbits.autograd.matmul_4bit import GEMV_MAX_ROWS

    B, state = quantized_weight(rng, 32, 64, "cpu")
    for shape in [(1, 1, 64), (3, 64), (GEMV_MAX_ROWS, 64)]:
        with OpRecorder() as small:
            matmul_4bit(torch.randn(*shape, generator=rng), B, state)
        assert "tritonbits.gemv_4bit.default" in small.names, shape
        assert "tritonbits.dequantize_4bit.default" not in small.names, shape
    with OpRecorder() as rows:
        matmul_4bit(torch.randn(GEMV_MAX_ROWS + 1, 64, generator=rng), B, state)
    assert "tritonbits.dequantize_4bit.default" in rows.names and "tritonbits.gemv_4bit.default" not in rows.names
    with OpRecorder() as grad_row:  # training a single row: the differentiable path
        matmul_4bit(torch.randn(1, 64, generator=rng, requires_grad=True), B, state)
    assert "tritonbits.gemv_4bit.default" not in grad_row.names


def test_nested_state_uses_the_nested_gemv(rng):
    w = torch.randn(32, 128, generator=rng)
    B, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    A = torch.randn(2, 128, generator=rng)
    with OpRecorder() as recorded:
        out = matmul_4bit(A, B, state)
    assert "tritonbits.gemv_4bit_nested.default" in recorded.names
    torch.testing.assert_close(out, A @ F.dequantize_4bit(B, state).T, rtol=0, atol=0)


def test_out_argument(rng):
    B, state = quantized_weight(rng, 32, 64, "cpu")
    for rows in (1, 5):
        A = torch.randn(rows, 64, generator=rng)
        out = torch.empty(rows, 32)
        assert matmul_4bit(A, B, state, out=out) is out
        torch.testing.assert_close(out, matmul_4bit(A, B, state), rtol=0, atol=0)


def test_transposed_packed_weight_is_accepted(rng):
    B, state = quantized_weight(rng, 32, 64, "cpu")
    A = torch.randn(3, 64, generator=rng)
    torch.testing.assert_close(matmul_4bit(A, B.t(), state), matmul_4bit(A, B, state), rtol=0, atol=0)


def test_weight_quantized_as_k_by_n_warns_and_works(rng):
    B, state = quantized_weight(rng, 64, 32, "cpu")  # [K, N], bitsandbytes' old orientation
    A = torch.randn(3, 64, generator=rng)
    with pytest.warns(DeprecationWarning, match="K, N"):
        out = matmul_4bit(A, B, state)
    W = decoded64(B, state, torch.float32)
    assert_close_to(out, A.double() @ W, torch.float32, A.double().abs() @ W.abs(), k=64)


def test_empty_input(rng):
    B, state = quantized_weight(rng, 32, 64, "cpu")
    assert matmul_4bit(torch.empty(0, 64), B, state).shape == (0, 32)
    A = torch.empty(2, 0, 64, requires_grad=True)
    out = matmul_4bit(A, B, state)
    out.sum().backward()
    assert out.shape == (2, 0, 32) and A.grad.shape == A.shape


def test_argument_errors(rng):
    B, state = quantized_weight(rng, 32, 64, "cpu")
    A = torch.randn(2, 64, generator=rng)
    with pytest.raises(ValueError, match="quant_state is required"):
        matmul_4bit(A, B, None)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        matmul_4bit(A, B, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="last dimension"):
        matmul_4bit(torch.randn(2, 48, generator=rng), B, state)
    with pytest.raises(ValueError, match="A must be float16"):
        matmul_4bit(A.double(), B, state)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("batch_shape", [(1,), (2, 3)], ids=["1row", "2x3"])
def test_backward_gives_input_and_bias_gradients(rng, device, dtype, compress_statistics, batch_shape):
    B, state = quantized_weight(rng, 24, 40, device, compress_statistics=compress_statistics)
    A = torch.randn(*batch_shape, 40, generator=rng).to(device, dtype).requires_grad_()
    bias = torch.randn(24, generator=rng).to(device, dtype).requires_grad_()
    grad_out = torch.randn(*batch_shape, 24, generator=rng).to(device, dtype)
    matmul_4bit(A, B, state, bias=bias).backward(grad_out)
    W, G = decoded64(B, state, dtype), grad_out.double()
    assert_close_to(A.grad, G @ W, dtype, G.abs() @ W.abs(), k=24)
    rows = G.reshape(-1, 24)
    assert_close_to(bias.grad, rows.sum(0), dtype, rows.abs().sum(0), k=rows.shape[0])


def test_bias_only_gradient_in_bias_dtype(rng):
    B, state = quantized_weight(rng, 24, 40, "cpu")
    A = torch.randn(4, 40, generator=rng, dtype=torch.bfloat16)
    bias = torch.randn(24, generator=rng).requires_grad_()  # float32 bias, bfloat16 compute
    out = matmul_4bit(A, B, state, bias=bias)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad, torch.full((24,), 4.0), rtol=0, atol=0)  # sum of 4 ones, exact


def test_backward_saves_only_the_packed_weight(rng):
    B, state = quantized_weight(rng, 64, 128, "cpu")
    A = torch.randn(8, 128, generator=rng, requires_grad=True)
    out = MatMul4Bit.apply(A, B, None, None, state)
    saved = out.grad_fn.saved_tensors
    # the QLoRA memory promise: nothing of W's full-precision size survives from forward
    assert len(saved) == 1 and saved[0].dtype == torch.uint8 and saved[0].numel() == 64 * 128 // 2
