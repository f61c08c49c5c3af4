"""tritonbits.optim vs bitsandbytes.optim: names, signatures, training, state dicts, overrides."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import tritonbits.optim as T

# class name -> constructor kwargs beyond params (only where bitsandbytes has no default lr or
# its default makes the small problem below crawl).
KWARGS = {"SGD": dict(lr=1e-2, momentum=0.9), "LARS": dict(lr=1e-2, momentum=0.9), "RMSprop": dict(lr=1e-3)}
CLASS_NAMES = sorted(
    n for n in dir(T) if inspect.isclass(getattr(T, n)) and n not in ("Optimizer8bit", "Optimizer1State", "Optimizer2State", "GlobalOptimManager")
)


def _kwargs(name):
    for family, kwargs in KWARGS.items():
        if name.removeprefix("Paged").startswith(family) and not name.startswith("PytorchLARS"):
            return dict(kwargs)
    return {"lr": 1e-2} if name == "PytorchLARS" else {}


def _problem(seed, shape):
    """A seeded least-squares problem: (parameter, loss closure)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen))
    target = torch.randn(shape, generator=gen)
    return w, lambda: ((w - target) ** 2).sum()


def _train(module, name, steps, seed=0, shape=(64, 65), **extra):
    w, loss_fn = _problem(seed, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = getattr(module, name)([w], **_kwargs(name), **extra)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    return w, opt, loss_fn


def test_public_names_and_signatures_match_bitsandbytes(bnb_ref):
    bnb_optim = bnb_ref.optim
    bnb_names = {n for n in dir(bnb_optim) if inspect.isclass(getattr(bnb_optim, n))}
    assert bnb_names <= set(dir(T))
    for name in bnb_names:
        theirs = inspect.signature(getattr(bnb_optim, name).__init__).parameters.values()
        ours = inspect.signature(getattr(T, name).__init__).parameters.values()
        # Ours may add keyword-only arguments (percentile_clipping, block_wise) at the end.
        ours = [p for p in ours if p.kind != inspect.Parameter.KEYWORD_ONLY]
        assert [(p.name, p.default, p.kind) for p in ours] == [(p.name, p.default, p.kind) for p in theirs], name


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_every_optimizer_decreases_loss(name):
    w, opt, loss_fn = _train(T, name, steps=0)
    before = loss_fn().item()
    w, opt, loss_fn = _train(T, name, steps=5)
    assert loss_fn().item() < before
    if "8bit" in name and not name.startswith(("LAMB", "LARS")):
        assert opt.state[w]["state1"].dtype == torch.uint8
    if "32bit" in name:
        assert opt.state[w]["state1"].dtype == torch.float32


PAIRS_8_32 = [
    ("Adam8bit", "Adam32bit"),
    ("AdamW8bit", "AdamW32bit"),
    ("Lion8bit", "Lion32bit"),
    ("SGD8bit", "SGD32bit"),
    ("RMSprop8bit", "RMSprop32bit"),
    ("Adagrad8bit", "Adagrad32bit"),
    ("AdEMAMix8bit", "AdEMAMix32bit"),
]


@pytest.mark.parametrize("name8, name32", PAIRS_8_32)
def test_8bit_tracks_32bit_as_closely_as_bitsandbytes(bnb_ref, name8, name32):
    # Both libraries' 8-bit optimizers against our 32-bit one (equal to bitsandbytes' 32-bit
    # within float32 rounding), 20 steps, mean |w8 - w32|. Ours must be within 5% of theirs.
    small = dict(steps=20, shape=(32, 40), min_8bit_size=256)
    ref, _, _ = _train(T, name32, **small)
    ours, _, _ = _train(T, name8, **small)
    theirs, _, _ = _train(bnb_ref.optim, name8, **small)
    gap_ours = (ours - ref).abs().mean().item()
    gap_theirs = (theirs - ref).abs().mean().item()
    assert gap_ours <= gap_theirs * 1.05, (gap_ours, gap_theirs)


@pytest.mark.parametrize("name", ["Adam32bit", "Adam8bit", "Lion8bit", "AdEMAMix8bit", "LAMB", "SGD8bit"])
def test_state_dict_round_trip_resumes_bit_identically(name):
    w, opt, loss_fn = _train(T, name, steps=3)
    saved = opt.state_dict()
    assert "__bnb_optimizer_quant_state__" in saved["state"][0]
    w_copy = torch.nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = getattr(T, name)([w_copy], **_kwargs(name))
    resumed.load_state_dict(saved)
    target = (w.detach() - 1.0).clone()
    for param, optimizer in ((w, opt), (w_copy, resumed)):
        for _ in range(3):
            optimizer.zero_grad()
            ((param - target) ** 2).sum().backward()
            optimizer.step()
    assert torch.equal(w, w_copy)


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "AdEMAMix8bit", "Adam32bit"])
@pytest.mark.parametrize("direction", ["bnb_to_ours", "ours_to_bnb"])
def test_state_dict_loads_across_libraries(bnb_ref, name, direction):
    source, target = (bnb_ref.optim, T) if direction == "bnb_to_ours" else (T, bnb_ref.optim)
    w, opt, loss_fn = _train(source, name, steps=3)
    saved = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = getattr(target, name)([w2], **_kwargs(name))
    other.load_state_dict(saved)
    loaded = other.state[w2]
    for key, value in opt.state[w].items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key
    # Training continues from the loaded state and the loss keeps falling.
    target_t = torch.randn(w2.shape, generator=torch.Generator().manual_seed(1))
    before = ((w2 - target_t) ** 2).sum().item()
    for _ in range(5):
        other.zero_grad()
        ((w2 - target_t) ** 2).sum().backward()
        other.step()
    assert ((w2 - target_t) ** 2).sum().item() < before
    assert other.state[w2]["step"] == opt.state[w]["step"] + 5


def test_min_8bit_size_keeps_small_tensors_32bit():
    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: exactly min_8bit_size
    small = torch.nn.Parameter(torch.randn(4095))
    opt = T.Adam8bit([big, small])
    (big.sum() + small.sum()).backward()
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["absmax1"].shape == (16,)
    assert opt.state[small]["state1"].dtype == torch.float32 and "absmax1" not in opt.state[small]
    opt2 = T.Adam8bit([torch.nn.Parameter(torch.randn(300))], min_8bit_size=100)
    opt2.param_groups[0]["params"][0].grad = torch.randn(300)
    opt2.step()
    state = opt2.state[opt2.param_groups[0]["params"][0]]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].shape == (2,)  # ceil(300 / 256)


def test_global_optim_manager_override_config():
    manager = T.GlobalOptimManager.get_instance()
    manager.initialize()
    w8, w32 = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64, 64))
    manager.register_parameters([w8, w32])
    manager.override_config(w32, "optim_bits", 32)
    manager.override_config(w8, key_value_dict={"lr": 0.0})
    opt = T.Adam([w8, w32], optim_bits=8)
    before = w8.detach().clone()
    (w8.sum() + w32.sum()).backward()
    opt.step()
    assert opt.state[w8]["state1"].dtype == torch.uint8
    assert opt.state[w32]["state1"].dtype == torch.float32
    assert torch.equal(w8, before)  # lr overridden to 0
    manager.initialize()


def test_bfloat16_and_non_contiguous_params():
    w = torch.nn.Parameter(torch.randn(80, 64).t().to(torch.bfloat16))  # non-contiguous bf16
    target = torch.zeros(64, 80, dtype=torch.bfloat16)
    opt = T.AdamW8bit([w], lr=1e-2, min_8bit_size=1)
    before = ((w.float() - target.float()) ** 2).sum().item()
    for _ in range(5):
        opt.zero_grad()
        ((w.float() - target.float()) ** 2).sum().backward()
        opt.step()
    assert w.dtype == torch.bfloat16
    assert ((w.float() - target.float()) ** 2).sum().item() < before


def test_percentile_clipping_and_argument_errors():
    w, opt, loss_fn = _train(T, "Adam", steps=3, percentile_clipping=5)
    assert opt.state[w]["gnorm_vec"].shape == (100,)
    with pytest.raises(ValueError, match="block_wise"):
        T.Adam8bit([w], block_wise=False)
    with pytest.raises(ValueError, match="amsgrad"):
        T.Adam8bit([w], amsgrad=True)
    with pytest.raises(NotImplementedError, match="momentum"):
        T.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        T.Adam([w], lr=-1.0)


def test_paged_on_cpu_behaves_like_unpaged():
    a, _, _ = _train(T, "PagedAdamW8bit", steps=3)
    b, _, _ = _train(T, "AdamW8bit", steps=3)
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged state streaming needs a CUDA GPU")
@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW", "PagedLion8bit"])
def test_paged_states_stream_through_the_gpu_and_match_unpaged(name):
    # several large parameters (copies in and out overlap updates), one small (its state stays on
    # the GPU) and one without a gradient; bit-identical to the unpaged optimizer
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1000, 200), (640, 640), (7, 3), (300, 1001), (512, 512)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in shapes]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = getattr(T, name)(params)
    opt_ref = getattr(T, name.removeprefix("Paged"))(refs)
    for step in range(4):
        grads = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
        for ps, optimizer in ((params, opt), (refs, opt_ref)):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if i == 3 and step % 2 else g.clone()
            optimizer.step()
    for p, ref in zip(params, refs):
        assert torch.equal(p, ref)
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and key in ("state1", "state2"):
                assert torch.equal(value.cpu(), opt_ref.state[ref][key].cpu())
                on_host = p.numel() >= 100_000
                assert (value.device.type == "cpu") == on_host and (not on_host or value.is_pinned())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged state streaming needs a CUDA GPU")
@pytest.mark.parametrize("map_location", ["cpu", "cuda"])
def test_paged_state_dict_resumes_paged_and_bit_identical(map_location):
    # a loaded state dict holds plain tensors: they go back to pinned host memory, and training
    # continues exactly as without the save and load
    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(1000, 200), (64, 64)]
    start = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
    grads = [[torch.randn(s, generator=gen, device="cuda") for s in shapes] for _ in range(4)]

    def run(params, opt, steps):
        for g in steps:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    straight = [torch.nn.Parameter(t.clone()) for t in start]
    opt = T.PagedAdamW8bit(straight)
    run(straight, opt, grads)
    first = [torch.nn.Parameter(t.clone()) for t in start]
    opt_first = T.PagedAdamW8bit(first)
    run(first, opt_first, grads[:2])
    saved = torch.utils._pytree.tree_map(
        lambda t: t.to(map_location) if isinstance(t, torch.Tensor) else t, opt_first.state_dict()
    )
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = T.PagedAdamW8bit(resumed)
    opt_resumed.load_state_dict(saved)
    big = opt_resumed.state[resumed[0]]["state1"]
    assert big.device.type == "cpu" and big.is_pinned() and big.is_paged
    assert opt_resumed.state[resumed[1]]["state1"].device.type == "cuda"  # small: on the GPU
    run(resumed, opt_resumed, grads[2:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
