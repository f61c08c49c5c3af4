"""The fused LLM.int8() inference kernel (int8_mixed_linear) against the reference composition.

Without outlier columns the result is bit-identical; with them the outlier product is summed in
another order than the reference's addmm, so it matches within a rounding of the output dtype.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from support import count_calls

# One ulp-ish of each output dtype, relative to the output's largest magnitude.
_OUTLIER_RTOL = {torch.float16: 2**-9, torch.bfloat16: 2**-6, torch.float32: 1e-6}


def _weight(rng, N, K, device):
    CB = torch.randint(-127, 128, (N, K), generator=rng, dtype=torch.int8).to(device)
    SCB = (torch.rand(N, generator=rng) * 2 + 0.05).to(device)
    return CB, SCB


def _activations(rng, shape, dtype, device, outlier_every=0):
    A = torch.randn(shape, generator=rng)
    if outlier_every:
        A[..., ::outlier_every] *= 4  # some of these columns cross the threshold, not all
    return A.to(dtype).to(device)


def _assert_matches(out, expected, dtype, exact):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if exact:
        assert torch.equal(out, expected)
    else:
        scale = expected.float().abs().max().item()
        assert (out.float() - expected.float()).abs().max().item() <= _OUTLIER_RTOL[dtype] * scale


@pytest.fixture(params=["one program", "per K tile", "in the product"])
def quantize_launches(request, monkeypatch):
    """A quantized in one program (small A, the default up to ONE_PROGRAM_ELEMENTS), by the two
    kernels of one program per K tile, or inside the product kernel (FUSED_A_MAX_WEIGHT)."""
    from tritonbits.backends.triton import int8_linear

    monkeypatch.setattr(int8_linear, "ONE_PROGRAM_ELEMENTS", 0 if request.param == "per K tile" else 1 << 30)
    monkeypatch.setattr(int8_linear, "FUSED_A_MAX_WEIGHT", 1 << 40 if request.param == "in the product" else 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 16, 17])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_matches_the_reference(device, launcher, reference, rng, quantize_launches, dtype, rows, threshold):
    # K not a multiple of the K tile and N not of the N tile: the masked edges; 17 rows: unfused.
    N, K = 70, 600
    CB, SCB = _weight(rng, N, K, device)
    A = _activations(rng, (rows, K), dtype, device, outlier_every=7 if threshold else 0)
    bias = torch.randn(N, generator=rng).to(dtype).to(device)
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, bias, threshold)
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), bias.cpu(), threshold)
    if threshold:
        assert expected_flags.any(), "the test must produce outlier columns"
        assert torch.equal(flags.cpu(), expected_flags)
    else:
        assert flags is None and expected_flags is None
    _assert_matches(out.cpu(), expected, dtype, exact=not threshold)


@pytest.mark.parametrize("rows", [1, 4])
def test_threshold_without_outliers_is_bit_identical_and_flags_nothing(device, launcher, reference, rng, rows):
    CB, SCB = _weight(rng, 96, 256, device)
    A = _activations(rng, (rows, 256), torch.float16, device)
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, None, 50.0)
    expected, _ = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, 50.0)
    assert not flags.any()
    assert torch.equal(out.cpu(), expected)


def test_threshold_compares_in_float16(device, launcher, reference, rng):
    # 2.0009 rounds down to 2.0 in float16; torch compares float16 |A| >= threshold in float16,
    # so an entry of exactly 2.0 is an outlier there although 2.0 < 2.0009.
    CB, SCB = _weight(rng, 64, 128, device)
    A = _activations(rng, (2, 128), torch.float16, device) * 0.25
    A[1, 5] = 2.0
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, None, 2.0009)
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, 2.0009)
    assert expected_flags[5] and torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.float16, exact=False)


def test_outliers_in_one_k_tile_only(device, launcher, reference, rng, quantize_launches):
    # K = 1024 in 512-wide K tiles, outliers taken 64 columns at a time: only the second tile
    # holds outlier columns, in two of its eight steps (640-703, 704-767); the rest are skipped.
    CB, SCB = _weight(rng, 64, 1024, device)
    A = _activations(rng, (3, 1024), torch.bfloat16, device)
    A[1, 700], A[2, 709] = 9.0, -12.0
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, None, 6.0)
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, 6.0)
    assert expected_flags.nonzero().view(-1).tolist() == [700, 709]
    assert torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.bfloat16, exact=False)


def test_batch_dims_and_strided_rows(device, launcher, reference, rng, quantize_launches):
    CB, SCB = _weight(rng, 40, 64, device)
    A = _activations(rng, (2, 3, 128), torch.float16, device)[..., ::2]  # every other column
    out, _ = launcher("int8_mixed_linear")(A, CB, SCB, None, 0.0)
    expected, _ = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, 0.0)
    assert out.shape == (2, 3, 40) and torch.equal(out.cpu(), expected)


def _layer_state(rng, N, K, device, threshold):
    from tritonbits.autograd.matmul_8bit import MatmulLtState

    state = MatmulLtState()
    state.CB, state.SCB = _weight(rng, N, K, device)
    state.threshold = threshold
    state.has_fp16_weights = False
    state.is_training = False
    return state


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_matmul_keeps_the_launch_on_the_state_and_follows_weight_changes(device, rng, monkeypatch, threshold):
    import tritonbits as bnb
    from tritonbits.backends import registry
    from tritonbits.backends.triton import int8_linear

    monkeypatch.setattr(registry, "triton_module", lambda op, tensor: int8_linear)
    N, K = 48, 256
    state = _layer_state(rng, N, K, device, threshold)
    A = _activations(rng, (1, 3, K), torch.float16, device, outlier_every=5 if threshold else 0)
    bias = torch.randn(N, generator=rng).half().to(device)

    def expected():
        from tritonbits._ops import REFERENCES

        return REFERENCES["int8_mixed_linear"](A.cpu(), state.CB.cpu(), state.SCB.cpu(), bias.cpu(), threshold)

    out = bnb.matmul(A, state.CB, state=state, bias=bias)
    launches = state.__dict__["_kept_launches"]
    (launch,) = [entry[1] for entry in launches.values()]
    assert isinstance(launch, int8_linear.Int8LinearLaunch)
    ref_out, ref_flags = expected()
    _assert_matches(out.cpu(), ref_out, torch.float16, exact=not threshold)
    if threshold:
        assert "_outlier_flags" in state.__dict__  # idx not computed until read
        assert torch.equal(state.idx.cpu(), torch.argwhere(ref_flags).view(-1))
    bnb.matmul(A, state.CB, state=state, bias=bias)
    assert [entry[1] for entry in launches.values()] == [launch]  # reused

    state.SCB.mul_(0.5)  # in place: the launch is rebuilt from the new scales
    out = bnb.matmul(A, state.CB, state=state, bias=bias)
    assert [entry[1] for entry in launches.values()] != [launch]
    _assert_matches(out.cpu(), expected()[0], torch.float16, exact=not threshold)

    assert "_kept_launches" not in copy.deepcopy(state).__dict__
    assert "_kept_launches" not in pickle.loads(pickle.dumps(state)).__dict__


def test_linear8bitlt_inference_through_the_fused_kernel(device, rng, monkeypatch):
    import tritonbits as bnb
    from tritonbits._ops import REFERENCES
    from tritonbits.backends import registry
    from tritonbits.backends.triton import int8_linear

    monkeypatch.setattr(registry, "triton_module", lambda op, tensor: int8_linear)
    dense = torch.nn.Linear(128, 64).half()
    layer = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device).eval()
    x = _activations(rng, (2, 128), torch.float16, device, outlier_every=9) * 2
    with torch.no_grad():
        out = layer(x)
    CB, SCB = layer.state.CB, layer.state.SCB
    expected, flags = REFERENCES["int8_mixed_linear"](x.cpu(), CB.cpu(), SCB.cpu(), layer.bias.detach().cpu(), 6.0)
    assert flags.any()
    _assert_matches(out.cpu(), expected, torch.float16, exact=False)
    assert any(isinstance(entry[1], int8_linear.Int8LinearLaunch) for entry in layer.state._kept_launches.values())


def test_kept_launch_reuses_its_buffers_per_thread(device, rng, monkeypatch):
    """The codes and stats buffers of a kept launch are reused by the next call from the same
    thread (and stream), while another thread gets its own; every call's result is right."""
    import threading

    from tritonbits._ops import REFERENCES
    from tritonbits.backends.triton import int8_linear

    CB, SCB = _weight(rng, 48, 256, device)
    launch = int8_linear._fused_launch(torch.empty(2, 256, dtype=torch.float16, device=device), CB, SCB, None, 3.0)
    inputs = [_activations(rng, (2, 256), torch.float16, device, outlier_every=5) for _ in range(3)]
    buffers = []

    def call(A, results):
        out, flags = launch.launch(A, None)
        results.append((A, out, flags.clone()))
        buffers.append(launch._workspace()[1].data_ptr())

    results = []
    call(inputs[0], results)
    call(inputs[1], results)
    worker = threading.Thread(target=call, args=(inputs[2], results))
    worker.start()
    worker.join()
    assert buffers[0] == buffers[1] != buffers[2]
    for A, out, flags in results:
        expected, expected_flags = REFERENCES["int8_mixed_linear"](A.cpu(), CB.cpu(), SCB.cpu(), None, 3.0)
        assert torch.equal(flags.cpu(), expected_flags)
        _assert_matches(out.cpu(), expected, torch.float16, exact=False)


def test_linear8bitlt_eager_plan_serves_repeated_calls_and_follows_changes(device, rng, monkeypatch):
    """After one eager inference call through the fused kernels, Linear8bitLt's next calls with
    the same input shape go straight to the kept launch (not through matmul); a change to the
    scales, the bias's dtype, the threshold, the input's shape, or a needed gradient takes the
    full path again, with the right result each time."""
    import tritonbits as bnb
    from tritonbits._ops import REFERENCES
    from tritonbits.backends import registry
    from tritonbits.backends.triton import int8_linear
    from tritonbits.nn import linear8bit

    monkeypatch.setattr(registry, "triton_module", lambda op, tensor: int8_linear)
    full_path_calls = count_calls(monkeypatch, linear8bit, "matmul")
    dense = torch.nn.Linear(128, 64).half()
    layer = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device).eval()

    def check(x, full_path):
        calls = len(full_path_calls)
        with torch.no_grad():
            out = layer(x)
        assert len(full_path_calls) - calls == int(full_path)
        CB, SCB, bias = layer.state.CB.cpu(), layer.state.SCB.cpu(), layer.bias.detach().cpu()
        expected, _ = REFERENCES["int8_mixed_linear"](x.cpu(), CB, SCB, bias.to(x.dtype), layer.state.threshold)
        _assert_matches(out.cpu(), expected, x.dtype, exact=False)

    x = _activations(rng, (1, 128), torch.float16, device, outlier_every=9) * 2
    check(x, full_path=True)
    check(_activations(rng, (1, 128), torch.float16, device, outlier_every=9) * 2, full_path=False)
    assert "_eager_plan" not in copy.deepcopy(layer.state).__dict__
    layer.state.SCB.mul_(0.5)
    check(x, full_path=True)
    check(x, full_path=False)
    layer.bias.data.add_(1.0)  # read at every launch
    check(x, full_path=False)
    layer.bias.data = layer.bias.data.float()  # the full path casts it back to the input's dtype
    check(x, full_path=True)
    check(x, full_path=False)
    layer.state.threshold = 3.0
    check(x, full_path=True)
    check(x[0], full_path=True)  # another shape
    check(x, full_path=True)
    check(x, full_path=False)
    x_grad = x.clone().requires_grad_()
    out = layer(x_grad)  # grad mode: the autograd path, and the input gets its gradient
    out.float().sum().backward()
    assert x_grad.grad is not None and len(full_path_calls) == 7


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_small_a_quantized_in_the_product_is_one_launch(device, reference, rng, monkeypatch, threshold):
    """With FUSED_A_MAX_WEIGHT a call is the product kernel's launch alone; its outlier flags
    (program 0 writes them) and its output are the reference's."""
    from tritonbits.backends.triton import int8_linear, kept_launch

    monkeypatch.setattr(int8_linear, "FUSED_A_MAX_WEIGHT", 1 << 40)
    CB, SCB = _weight(rng, 200, 1000, device)  # 200 outputs: several programs, each quantizing A
    A = _activations(rng, (2, 1000), torch.float16, device, outlier_every=7 if threshold else 0)
    launch = int8_linear._fused_launch(A, CB, SCB, None, threshold)
    assert launch.one_program and launch.fused_a
    runs = count_calls(monkeypatch, kept_launch.KeptLaunch, "_run")
    out, flags = launch.launch(A, None)
    assert len(runs) == 1
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, threshold)
    if threshold:
        assert expected_flags.any() and torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.float16, exact=not threshold)


@pytest.mark.parametrize("K", [3000, 5120, 11008])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_k_tiles_that_are_no_power_of_two(device, launcher, reference, rng, quantize_launches, K, rows, threshold):
    """K of Llama-2's widths (5120, 11008) and an odd one: the one-program quantize kernel's tile is
    K's tiles rounded up to a power of two (tl.arange takes no other length: these failed)."""
    CB, SCB = _weight(rng, 48, K, device)
    A = _activations(rng, (rows, K), torch.float16, device, outlier_every=97 if threshold else 0)
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, None, threshold)
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, threshold)
    if threshold:
        assert expected_flags.any() and torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.float16, exact=not threshold)


@pytest.mark.parametrize("K, N", [(4096, 4096), (8192, 28672), (11008, 4096)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [1, 16])
def test_decode_sizes_compile_and_match(device, launcher, reference, rng, K, N, threshold, rows):
    """The tile choices at real sizes (shared memory is checked only when a GPU compiles them);
    one row takes the one-program quantize kernel, 16 rows the K-tile kernels."""
    if device != "cuda":
        pytest.skip("real sizes only on a GPU (the interpreter does not check shared memory)")
    CB, SCB = _weight(rng, N, K, device)
    A = _activations(rng, (rows, K), torch.float16, device, outlier_every=97 if threshold else 0) * 2
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, None, threshold)
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), None, threshold)
    if threshold:
        assert expected_flags.any() and torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.float16, exact=not threshold)


def test_more_rows_while_capturing_a_cuda_graph_need_no_host_sync(device, launcher, reference, rng, monkeypatch):
    """Over 16 rows with a threshold the outlier columns' indices need the host; while a CUDA
    graph is captured the outlier product runs over every column instead (same values)."""
    from tritonbits.backends.triton import int8_linear

    monkeypatch.setattr(int8_linear, "_capturing", lambda A: True)
    monkeypatch.setattr(torch, "argwhere", lambda *a, **k: pytest.fail("host sync while capturing"))
    CB, SCB = _weight(rng, 48, 256, device)
    A = _activations(rng, (40, 256), torch.float16, device, outlier_every=11)
    bias = torch.randn(48, generator=rng).half().to(device)
    out, flags = launcher("int8_mixed_linear")(A, CB, SCB, bias, 3.0)
    monkeypatch.undo()
    expected, expected_flags = reference("int8_mixed_linear")(A.cpu(), CB.cpu(), SCB.cpu(), bias.cpu(), 3.0)
    assert expected_flags.any() and torch.equal(flags.cpu(), expected_flags)
    _assert_matches(out.cpu(), expected, torch.float16, exact=False)


@pytest.mark.parametrize("rows", [1, 40])
def test_linear8bitlt_with_threshold_replays_from_a_cuda_graph(device, rng, rows):
    import tritonbits as bnb

    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    dense = torch.nn.Linear(256, 64).half()
    layer = bnb.nn.Linear8bitLt(256, 64, has_fp16_weights=False, threshold=3.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device).eval()
    x = _activations(rng, (rows, 256), torch.float16, device, outlier_every=13)
    with torch.no_grad():
        expected = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up: compile the kernels, keep the launch
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    _assert_matches(captured.cpu(), expected.cpu(), torch.float16, exact=rows <= 16)
