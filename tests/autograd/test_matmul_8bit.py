"""LLM.int8() ``matmul``: forward against float math and the real bitsandbytes, outliers, backward."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch

from tritonbits.autograd.matmul_8bit import MatMul8bitFp, MatMul8bitLt, MatmulLtState, matmul

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (A shape, N): odd sizes, a single row, a 3-D batch and a 1-D vector.
SHAPES = [((1, 33), 7), ((17, 64), 24), ((2, 5, 40), 9), ((40,), 16)]

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt.*cast:UserWarning")


def _inputs(rng, a_shape, n, dtype, device="cpu", outlier_cols=(), scale=20.0):
    """Seeded A [..., K] and W [N, K], with the given columns of A scaled by ``scale``."""
    A = torch.randn(a_shape, generator=rng)
    for c in outlier_cols:
        A[..., c] *= scale
    W = torch.randn(n, a_shape[-1], generator=rng) / a_shape[-1] ** 0.5
    bias = torch.randn(n, generator=rng)
    return A.to(device, dtype), W.to(device, dtype), bias.to(device, dtype)


def _state(has_fp16_weights: bool, is_training: bool, threshold: float = 0.0) -> MatmulLtState:
    state = MatmulLtState()
    state.has_fp16_weights = has_fp16_weights
    state.is_training = is_training
    state.threshold = threshold
    return state


def _dequantized(W: torch.Tensor) -> torch.Tensor:
    """W through float16 row-wise int8 and back, in float64 (independent of the library)."""
    W16 = W.to(torch.float16).double()
    absmax = W16.abs().amax(1, keepdim=True)
    return torch.round(W16 * 127 / absmax) * absmax / 127


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_matches_bitsandbytes(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal up to the dequantization constant: tritonbits scales by the exact 1/127**2 where
    bitsandbytes uses 6.200124e-05 (1.8e-5 relative too high), so an output may differ by that
    much plus one rounding step of its dtype; allow 2e-5 + 2 eps relative to each output and to
    the output's scale (the int8 part is rounded before the outlier product may cancel it)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    diff = (ours.double() - theirs.double()).abs()
    rtol = 2e-5 + 2 * torch.finfo(theirs.dtype).eps
    bound = rtol * (theirs.double().abs() + theirs.double().abs().max())
    assert torch.all(diff <= bound), diff.max()


def _bnb_state(bnb_ref, has_fp16_weights, is_training, threshold=0.0):
    state = bnb_ref.MatmulLtState()
    state.has_fp16_weights, state.is_training, state.threshold = has_fp16_weights, is_training, threshold
    return state


# --------------------------------------------------------------------------------------------
# MatmulLtState and the public signature


def test_state_matches_bitsandbytes(bnb_ref):
    ours, theirs = MatmulLtState(), bnb_ref.MatmulLtState()
    assert [(f.name, f.default) for f in dataclasses.fields(MatmulLtState)] == [
        (f.name, f.default) for f in dataclasses.fields(type(theirs))
    ]
    for name in ("threshold", "is_training", "has_fp16_weights", "use_pool", "has_accumulated_gradients"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert inspect.signature(matmul).parameters.keys() == inspect.signature(bnb_ref.matmul).parameters.keys()
    for name, p in inspect.signature(bnb_ref.matmul).parameters.items():
        assert inspect.signature(matmul).parameters[name].default == p.default, name


def test_state_deprecated_fields_and_reset():
    state = MatmulLtState(CB=torch.ones(2, 2, dtype=torch.int8), SCB=torch.ones(2))
    with pytest.warns(FutureWarning, match="CxB"):
        assert state.CxB is None
    with pytest.raises(AttributeError, match="nonexistent"):
        state.nonexistent  # noqa: B018
    state.reset_grads()
    assert state.CB is None and state.SCB is None


# --------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,n", SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 2.5])
@pytest.mark.parametrize("training", [False, True], ids=["int8-path", "dequant-path"])
def test_forward_against_float_math(rng, dtype, a_shape, n, threshold, training):
    A, W, bias = _inputs(rng, a_shape, n, dtype)
    state = _state(has_fp16_weights=False, is_training=training, threshold=threshold)
    out = matmul(A, W, state=state, bias=bias)
    assert out.shape == (*a_shape[:-1], n) and out.dtype == dtype
    ref = A.double() @ W.double().t() + bias.double()
    # int8 rows on both sides: ~0.5/127 relative error per factor; 3% leaves room for bf16 output
    # rounding (2**-8) on short rows.
    assert _rel_err(out, ref) < 0.03
    assert state.CB.dtype == torch.int8 and state.SCB.shape == (n,)
    assert torch.allclose(state.SCB, W.to(torch.float16).float().abs().amax(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("training", [False, True], ids=["int8-path", "dequant-path"])
def test_forward_identical_to_bitsandbytes(rng, bnb_ref, dtype, threshold, training):
    A, W, bias = _inputs(rng, (3, 7, 48), 20, dtype, outlier_cols=(5, 30))
    ours = matmul(A, W, state=_state(False, training, threshold), bias=bias)
    state = _bnb_state(bnb_ref, False, training, threshold)
    theirs = bnb_ref.matmul(A, W, state=state, bias=bias)
    if training:
        assert torch.equal(ours, theirs)  # dequantize-then-matmul: the same operations in the same order
    else:
        assert_matches_bitsandbytes(ours, theirs)


def test_outlier_columns_go_through_16bit(rng):
    A, W, _ = _inputs(rng, (16, 64), 32, torch.float16, outlier_cols=(3, 40))
    state = _state(False, is_training=False, threshold=6.0)
    out = matmul(A, W, state=state)
    expected_cols = torch.nonzero((A.abs() >= 6.0).any(0)).view(-1)
    assert torch.equal(state.idx, expected_cols) and {3, 40} <= set(state.idx.tolist())

    # Independent reconstruction: int8 product of the other columns + exact outlier product.
    cols = state.idx
    A_in = A.double().clone()
    A_in[:, cols] = 0
    absA = A_in.abs().amax(1, keepdim=True)
    qA = torch.round(A_in * 127 / absA) * absA / 127
    Wdq = _dequantized(W)
    expected = qA @ Wdq.t() + A.double()[:, cols] @ Wdq[:, cols].t()
    # the only differences left are float16 rounding of the output (2**-11 relative)
    diff = (out.double() - expected).abs()
    assert diff.max() < 2e-3 * expected.abs().max(), diff.max()

    ref = A.double() @ W.double().t()
    plain = matmul(A, W, state=_state(False, is_training=False, threshold=0.0))
    assert _rel_err(out, ref) < 0.5 * _rel_err(plain, ref), "decomposition must beat plain int8 on outliers"


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_accuracy_not_worse_than_bitsandbytes(rng, bnb_ref, kind, threshold):
    cols = (2, 17, 50, 101) if kind == "outliers" else ()
    A, W, bias = _inputs(rng, (64, 256), 128, torch.float16, outlier_cols=cols)
    ref = A.double() @ W.double().t() + bias.double()
    ours = _rel_err(matmul(A, W, state=_state(False, False, threshold), bias=bias), ref)
    theirs = _rel_err(bnb_ref.matmul(A, W, state=_bnb_state(bnb_ref, False, False, threshold), bias=bias), ref)
    assert ours <= theirs * 1.05, (ours, theirs)  # stated bound: within 5% of bitsandbytes' error


def test_noncontiguous_input_and_out(rng):
    A = torch.randn(24, 10, generator=rng).half()
    W = torch.randn(6, 24, generator=rng).half()
    At = A.t()  # [10, 24] view, not contiguous
    assert not At.is_contiguous()
    expected = matmul(At.contiguous(), W, state=_state(False, is_training=False))
    out = torch.empty(10, 6, dtype=torch.float16)
    result = matmul(At, W, out=out, state=_state(False, is_training=False))
    assert result is out and torch.equal(out, expected)


def test_empty_input(rng):
    W = torch.randn(5, 8, generator=rng, requires_grad=True)
    A = torch.randn(0, 8, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    out = matmul(A, W, state=_state(True, is_training=False), bias=bias)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert A.grad.shape == (0, 8) and torch.count_nonzero(W.grad) == 0 and torch.count_nonzero(bias.grad) == 0
    A = torch.randn(3, 0, 8)
    assert matmul(A, W.detach(), state=_state(False, is_training=False)).shape == (3, 0, 5)


def test_int8_weight_argument(rng):
    from tritonbits.nn.linear8bit import Int8Params

    A, W, _ = _inputs(rng, (4, 32), 8, torch.float16)
    param = Int8Params(W.float().clone(), requires_grad=False).to("cpu")  # quantizes
    assert param.dtype == torch.int8
    direct = matmul(A, param, state=_state(False, is_training=False))
    assert torch.equal(direct, matmul(A, W, state=_state(False, is_training=False)))
    with pytest.raises(ValueError, match="SCB"):
        matmul(A, param.data.clone(), state=_state(False, is_training=False))
    with pytest.raises(ValueError, match=r"B \[N, K\]"):
        matmul(A, W.view(-1), state=_state(False, is_training=False))


def test_training_requantizes_unless_weight_has_grad(rng):
    A, W, _ = _inputs(rng, (4, 32), 8, torch.float16)
    W = W.clone().requires_grad_()
    state = _state(has_fp16_weights=True, is_training=True)
    first = matmul(A, W, state=state).detach()
    CB_before = state.CB
    with torch.no_grad():
        W.mul_(2.0)
    second = matmul(A, W, state=state).detach()
    assert not torch.equal(first, second) and state.CB is not CB_before  # re-quantized from the new W
    W.grad = torch.ones_like(W)
    with torch.no_grad():
        W.mul_(2.0)
    # bitsandbytes keeps the old quantization while the weight holds an accumulated gradient.
    assert torch.equal(matmul(A, W, state=state).detach(), second)


# --------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,n", SHAPES[:3])
@pytest.mark.parametrize("training", [False, True], ids=["int8-path", "dequant-path"])
def test_input_grad_inference_mode(rng, dtype, a_shape, n, training):
    A, W, bias = _inputs(rng, a_shape, n, dtype)
    A.requires_grad_()
    bias.requires_grad_()
    state = _state(has_fp16_weights=False, is_training=training, threshold=2.0)
    out = matmul(A, W, state=state, bias=bias)
    grad = torch.randn(out.shape, generator=rng).to(dtype)
    out.backward(grad)
    g2 = grad.double().reshape(-1, n)
    expected_A = (g2 @ _dequantized(W)).reshape(a_shape)
    # grad_A goes through the dequantized int8 weight in A's dtype: rounding of that dtype only
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    assert _rel_err(A.grad, expected_A) < tol
    assert bias.grad.shape == bias.shape and _rel_err(bias.grad, g2.sum(0)) < tol


@pytest.mark.parametrize("training", [False, True], ids=["int8-path", "dequant-path"])
def test_input_grad_identical_to_bitsandbytes(rng, bnb_ref, training):
    A, W, bias = _inputs(rng, (3, 5, 40), 12, torch.float16, outlier_cols=(7,))
    grads = []
    for lib, state in ((None, _state(False, training, 4.0)), (bnb_ref, _bnb_state(bnb_ref, False, training, 4.0))):
        a, b = A.clone().requires_grad_(), bias.clone().requires_grad_()
        fn = matmul if lib is None else lib.matmul
        out = fn(a, W, state=state, bias=b)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), a.grad, b.grad))
    (out, grad_A, grad_bias), (out2, grad_A2, grad_bias2) = grads
    assert torch.equal(grad_A, grad_A2) and torch.equal(grad_bias, grad_bias2)  # same dequantized CB
    assert_matches_bitsandbytes(out, out2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,n", SHAPES[:3])
def test_weight_grad_training_dequant_path(rng, bnb_ref, dtype, a_shape, n):
    """CPU training (bitsandbytes' MatMul8bitFp): exact grad.T @ A for the weight."""
    A, W, bias = _inputs(rng, a_shape, n, dtype)
    W.requires_grad_()
    out = matmul(A, W, state=_state(True, True), bias=bias)
    grad = torch.randn(out.shape, generator=rng).to(dtype)
    out.backward(grad)
    expected = grad.double().reshape(-1, n).t() @ A.double().reshape(-1, a_shape[-1])
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]  # dtype rounding
    assert W.grad.dtype == dtype and _rel_err(W.grad, expected) < tol
    if len(a_shape) == 2:  # bitsandbytes' own version fails on 3-D inputs
        W2 = W.detach().clone().requires_grad_()
        out2 = bnb_ref.matmul(A, W2, state=_bnb_state(bnb_ref, True, True), bias=bias)
        out2.backward(grad)
        assert torch.equal(out.detach(), out2.detach()) and torch.equal(W.grad, W2.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("a_shape,n", [((33, 48), 20), ((2, 9, 40), 12)])
def test_weight_grad_training_int8_path(rng, dtype, threshold, a_shape, n):
    """The GPU training path (int8 weight gradient), run here through the references."""
    A, W, bias = _inputs(rng, a_shape, n, dtype, outlier_cols=(4, 11))
    A.requires_grad_()
    W.requires_grad_()
    bias.requires_grad_()
    state = _state(has_fp16_weights=True, is_training=True, threshold=threshold)
    out = MatMul8bitLt.apply(A, W, None, bias, state)
    grad = torch.randn(out.shape, generator=rng)
    grad[..., :3] *= 10  # uneven columns: row-quantized values with column scales would fail here
    grad = grad.to(dtype)
    out.backward(grad)
    g2, A2 = grad.double().reshape(-1, n), A.detach().double().reshape(-1, a_shape[-1])
    # int8 on both factors: ~1% relative error on random data (LLM.int8() paper, Table 1 scale)
    assert W.grad.dtype == dtype and _rel_err(W.grad, g2.t() @ A2) < 0.03
    assert _rel_err(A.grad, (g2 @ _dequantized(W.detach())).reshape(a_shape)) < 2e-2
    assert _rel_err(bias.grad, g2.sum(0)) < 1e-2
    if threshold:
        assert state.idx.numel() >= 2


def test_matmul_dispatch(rng, monkeypatch):
    A, W, _ = _inputs(rng, (4, 16), 4, torch.float16)
    A.requires_grad_(True)
    used = []
    for fn in (MatMul8bitLt, MatMul8bitFp):
        monkeypatch.setattr(fn, "apply", (lambda name: lambda *a: used.append(name) or torch.zeros(4, 4))(fn.__name__))
    matmul(A, W, state=_state(False, is_training=True))
    matmul(A, W, state=_state(False, is_training=False))
    assert used == ["MatMul8bitFp", "MatMul8bitLt"]
    state = _state(False, is_training=False)
    matmul(A, W, state=state, threshold=5.0)
    assert state.threshold == 5.0
    # Nothing to differentiate: no autograd Function at all (its host time matters at decode).
    used.clear()
    matmul(A.detach(), W, state=_state(False, is_training=False))
    with torch.no_grad():
        matmul(A, W, state=_state(False, is_training=False))
    assert used == []


def test_warns_on_non_float16_input(rng):
    A, W, _ = _inputs(rng, (4, 16), 4, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        matmul(A, W, state=_state(False, is_training=False))
    assert any("cast from torch.float32 to float16" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("training", [False, True])
def test_gpu_matches_bitsandbytes(rng, bnb_ref, threshold, training):
    A, W, bias = _inputs(rng, (4, 33, 256), 192, torch.float16, device="cuda", outlier_cols=(3, 77))
    A.requires_grad_()
    W.requires_grad_()
    ref = A.double() @ W.double().t() + bias.double()
    out = matmul(A, W, state=_state(True, training, threshold), bias=bias)
    out2 = bnb_ref.matmul(A, W, state=_bnb_state(bnb_ref, True, training, threshold), bias=bias)
    assert _rel_err(out, ref) <= _rel_err(out2, ref) * 1.05
    grad = torch.randn(out.shape, generator=rng).half().cuda()
    out.backward(grad)
    assert _rel_err(W.grad, grad.double().reshape(-1, 192).t() @ A.detach().double().reshape(-1, 256)) < 0.03
