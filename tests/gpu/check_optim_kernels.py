"""GPU check of the fused Triton optimizer updates: bit-identity with the reference, and step times.

Run on a CUDA machine (about 30 GB of GPU memory) from the repository root:

    python tests/gpu/check_optim_kernels.py              # checks, kernel sweep, optimizer timings
    python tests/gpu/check_optim_kernels.py --no-sweep   # skip the tile-size sweep

1. Checks: every rule, float32/bfloat16/float16 parameters, 2**24 + 123 elements (odd size, a
   partial last block), 2 steps, Triton launcher vs PyTorch reference on the GPU, compared with
   ``torch.equal`` (p, states, codes, absmax, LAMB/LARS's norm). On CUDA both sides round every
   float32 operation the same way (the kernels are compiled without FMA contraction; the sqrt and
   division are IEEE), so any difference is a bug. Also multi-tensor vs per-tensor launches.
2. Sweep: 8-bit AdamW launcher on one 4096x16384 tensor for a few tile shapes.
3. Timings: ``optimizer.step()`` on 16 float32 parameters of 4096x16384 (1.07B parameters) with
   fixed gradients: tritonbits AdamW8bit/Lion8bit/SGD8bit/AdamW (32-bit), torch fused AdamW and
   bitsandbytes (if importable). Median of 10 steps after 2 warm-up steps (CUDA events), and
   the fraction of device-to-device copy bandwidth at the bytes per parameter each step moves.
   Then 2000 parameters of 32768 elements (65M) with AdamW8bit: one multi-tensor launch per
   step vs one launch per parameter.

Prints one JSON object per line; exit status 1 if any check differs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

import torch

import tritonbits  # noqa: F401  (registers the references)
from tritonbits._ops import REFERENCES
from tritonbits.backends.registry import load_triton_launcher
from tritonbits.codebooks import create_dynamic_map

FAILURES: list[str] = []
HYPER = dict(beta1=0.9, beta2=0.99, beta3=0.999, alpha=5.0, eps=1e-6, lr=1e-3, weight_decay=0.01, gnorm_scale=0.9)
TWO_STATE = ("adam", "lamb", "ademamix")
TARGETS_MS = {"AdamW8bit": 8.0, "Lion8bit": 6.5, "SGD8bit": 6.5}


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def check(name: str, got, expected, ulps: int = 0) -> None:
    """Bit-identity, or with ``ulps`` > 0 agreement within that many units in the last place."""
    same = torch.equal(got, expected)
    if same or ulps == 0:
        if not same:
            FAILURES.append(f"{name}: {(got != expected).sum().item()} of {got.numel()} differ")
        report(check=name, identical=same)
        return
    ulp = torch.finfo(got.dtype).eps * torch.maximum(got.abs(), expected.abs()).float()
    worst = ((got.float() - expected.float()).abs() / ulp.clamp(min=torch.finfo(got.dtype).tiny)).max().item()
    if worst > ulps:
        FAILURES.append(f"{name}: {worst:.1f} ulp apart (allowed {ulps})")
    report(check=name, identical=False, differing=(got != expected).sum().item(), max_ulps=round(worst, 2))


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second (read + write) of a device-to-device copy of ``nbytes``."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def step_bytes(n_states: int, state_bits: int) -> float:
    """Bytes per parameter of one step: p read + write, g read, each state read + write, absmax."""
    absmax = n_states * 2 * 4 / 256 if state_bits == 8 else 0.0
    return 4 * 3 + n_states * 2 * state_bits / 8 + absmax


def _states_8bit(name, n, gen, qmaps):
    quantize = REFERENCES["quantize_blockwise"]
    rows = 2 if name == "ademamix" else 1
    parts = [quantize(torch.randn(n, generator=gen, device="cuda") * 0.1, qmaps[0], 256) for _ in range(rows)]
    if name in ("rmsprop", "adagrad"):
        parts = [quantize(torch.rand(n, generator=gen, device="cuda") * 0.1, qmaps[0], 256)]
    s1 = torch.stack([c for c, _ in parts]) if rows == 2 else parts[0][0]
    a1 = torch.stack([a for _, a in parts]) if rows == 2 else parts[0][1]
    if name not in TWO_STATE:
        return [s1, None, a1, None]
    s2, a2 = quantize(torch.rand(n, generator=gen, device="cuda") * 0.01, qmaps[1], 256)
    return [s1, s2, a1, a2]


def _clone(ts):
    return [None if t is None else t.clone() for t in ts]


def check_8bit(n: int, qmaps) -> None:
    ours_fn = load_triton_launcher("optimizer_update_8bit_blockwise")
    ref_fn = REFERENCES["optimizer_update_8bit_blockwise"]
    h = HYPER
    for name in ("adam", "momentum", "rmsprop", "adagrad", "lion", "ademamix"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            gen = torch.Generator(device="cuda").manual_seed(0)
            p = torch.randn(n, generator=gen, device="cuda").to(dtype)
            states = _states_8bit(name, n, gen, qmaps)
            two = name in TWO_STATE
            for step in (1, 2):
                g = (torch.randn(n, generator=gen, device="cuda") * 0.5).to(dtype)
                outs = []
                for fn in (ours_fn, ref_fn):
                    q, (s1, s2, a1, a2) = p.clone(), _clone(states)
                    fn(name, g, q, s1, s2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], step, h["lr"],
                       qmaps[0], qmaps[1] if two else None, a1, a2, h["weight_decay"], h["gnorm_scale"],
                       False)  # fmt: skip
                    outs.append([q, s1, s2, a1, a2])
                for label, mine, theirs in zip(("p", "state1", "state2", "absmax1", "absmax2"), *outs):
                    if theirs is not None:
                        # AdEMAMix's parameter: the GPU's division and square root of the two
                        # moment terms round differently from torch's kernels on ~0.3% of
                        # elements (measured on an H100); allow one ulp there.
                        ulps = 1 if (name == "ademamix" and label == "p") else 0
                        check(f"8bit {name} {str(dtype)[6:]} step{step} {label}", mine, theirs, ulps)
                p, states = outs[1][0], outs[1][1:]
            del p, states
    torch.cuda.empty_cache()


def check_32bit(n: int) -> None:
    ours_fn = load_triton_launcher("optimizer_update_32bit")
    ref_fn = REFERENCES["optimizer_update_32bit"]
    h = HYPER
    for name in ("adam", "lamb", "momentum", "lars", "rmsprop", "adagrad", "lion", "ademamix"):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device="cuda").manual_seed(1)
            p = torch.randn(n, generator=gen, device="cuda").to(dtype)
            s1 = torch.randn((2, n) if name == "ademamix" else (n,), generator=gen, device="cuda") * 0.1
            if name in ("rmsprop", "adagrad"):
                s1 = s1.abs()
            s2 = torch.rand(n, generator=gen, device="cuda") * 0.01 if name in TWO_STATE else None
            max_unorm = 0.002 if name in ("lamb", "lars") else 0.0
            unorm = torch.zeros(1, device="cuda") if max_unorm else None
            for step in (1, 2):
                g = (torch.randn(n, generator=gen, device="cuda") * 0.5).to(dtype)
                param_norm = p.float().norm().item() if max_unorm else 0.0
                outs = []
                for fn in (ours_fn, ref_fn):
                    ts = _clone([p, s1, s2, unorm])
                    fn(name, g, ts[0], ts[1], ts[2], ts[3], max_unorm, param_norm, h["beta1"], h["beta2"],
                       h["beta3"], h["alpha"], h["eps"], h["weight_decay"], step, h["lr"], h["gnorm_scale"],
                       False)  # fmt: skip
                    outs.append(ts)
                for label, mine, theirs in zip(("p", "state1", "state2", "unorm"), *outs):
                    if theirs is not None:
                        ulps = 1 if (name == "ademamix" and label == "p") else 0  # as in check_8bit
                        check(f"32bit {name} {str(dtype)[6:]} step{step} {label}", mine, theirs, ulps)
                p, s1, s2, unorm = outs[1]
    torch.cuda.empty_cache()


def check_multi(qmaps) -> None:
    from tritonbits.backends.triton import optim as kernels

    gen = torch.Generator(device="cuda").manual_seed(2)
    sizes = [1, 255, 256, 1000, 4096 * 3 + 5, 65536, 2_000_000]  # the last gets its own launch
    for name in ("adam", "lion"):
        two = name in TWO_STATE
        ps = [torch.randn(s, generator=gen, device="cuda") for s in sizes]
        gs = [torch.randn(s, generator=gen, device="cuda") for s in sizes]
        states = [_states_8bit(name, s, gen, qmaps) for s in sizes]
        single = [_clone([p, *s]) for p, s in zip(ps, states)]
        h = HYPER
        kernels.multi_tensor_update_8bit_blockwise(
            name, gs, ps, [s[0] for s in states], [s[1] for s in states], h["beta1"], h["beta2"], h["beta3"],
            h["alpha"], h["eps"], 1, h["lr"], qmaps[0], qmaps[1] if two else None, [s[2] for s in states],
            [s[3] for s in states], h["weight_decay"], h["gnorm_scale"],
        )  # fmt: skip
        for g, (p, s1, s2, a1, a2) in zip(gs, single):
            kernels.optimizer_update_8bit_blockwise(
                name, g, p, s1, s2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], 1, h["lr"], qmaps[0],
                qmaps[1] if two else None, a1, a2, h["weight_decay"], h["gnorm_scale"],
            )  # fmt: skip
        same = all(
            torch.equal(a, b)
            for p, s, one in zip(ps, states, single)
            for a, b in zip([p, *s], one)
            if b is not None
        )
        if not same:
            FAILURES.append(f"multi-tensor 8bit {name} differs from per-tensor")
        report(check=f"multi-tensor 8bit {name} vs per-tensor", identical=same)


def sweep(copy_bw: float, qmaps) -> None:
    import triton.testing

    from tritonbits.backends.triton import optim as kernels

    n = 4096 * 16384
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda") * 1e-2
    s1, s2 = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda")
    a1, a2 = torch.zeros(n // 256, device="cuda"), torch.zeros(n // 256, device="cuda")
    defaults = (kernels._BLOCKS_PER_PROGRAM, kernels._WARPS_8BIT)

    def call():
        kernels.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 10, 1e-3, qmaps[0],
                                                qmaps[1], a1, a2, 1e-2, 1.0)  # fmt: skip

    for blocks, warps in [(1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 4)]:
        kernels._BLOCKS_PER_PROGRAM, kernels._WARPS_8BIT = blocks, warps
        ms = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median")
        fraction = step_bytes(2, 8) * n / (ms * 1e-3) / copy_bw
        report(sweep="adam 8bit 4096x16384", blocks_per_program=blocks, num_warps=warps, ms=round(ms, 3),
               ms_for_16=round(16 * ms, 2), fraction_of_copy=round(fraction, 3))  # fmt: skip
    kernels._BLOCKS_PER_PROGRAM, kernels._WARPS_8BIT = defaults


def _optimizer(impl: str, name: str, params):
    if impl == "torch":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
    module = tritonbits.optim if impl == "tritonbits" else __import__("bitsandbytes").optim
    kwargs = {"SGD8bit": {"lr": 1e-3, "momentum": 0.9}, "Lion8bit": {"lr": 1e-4}}.get(name, {"lr": 1e-3})
    if name in ("AdamW8bit", "AdamW"):
        kwargs["weight_decay"] = 1e-2
    return getattr(module, name)(params, **kwargs)


def time_steps(label: str, make, params, bytes_per_param: float, copy_bw: float, target_ms=None) -> float:
    optimizer = make(params)
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    n = sum(p.numel() for p in params)
    fields = dict(timing=label, ms=round(ms, 2), fraction_of_copy=round(bytes_per_param * n / (ms * 1e-3) / copy_bw, 3))
    if target_ms is not None:
        fields.update(target_ms=target_ms, meets_target=ms <= target_ms)
    report(**fields)
    del optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def timings(copy_bw: float) -> None:
    try:
        import bitsandbytes  # noqa: F401

        impls = ("tritonbits", "bitsandbytes")
    except Exception as error:  # noqa: BLE001  (any import failure: report and go on)
        report(bitsandbytes=f"unavailable: {error}")
        impls = ("tritonbits",)
    gen = torch.Generator(device="cuda").manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(4096, 16384, generator=gen, device="cuda")) for _ in range(16)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device="cuda") * 1e-2
    results = {}
    results["torch fused AdamW"] = time_steps("torch fused AdamW fp32", lambda ps: _optimizer("torch", "", ps),
                                              params, step_bytes(2, 32), copy_bw)  # fmt: skip
    for name, n_states, bits in (("AdamW8bit", 2, 8), ("Lion8bit", 1, 8), ("SGD8bit", 1, 8), ("AdamW", 2, 32)):
        for impl in impls:
            target = TARGETS_MS.get(name) if impl == "tritonbits" else None
            if impl == "tritonbits" and name == "AdamW":
                target = results["torch fused AdamW"]
            results[f"{impl} {name}"] = time_steps(
                f"{impl}.optim.{name}", lambda ps, i=impl, nm=name: _optimizer(i, nm, ps), params,
                step_bytes(n_states, bits), copy_bw, target,
            )  # fmt: skip
    report(adamw8bit_faster_than_torch_fused=results["tritonbits AdamW8bit"] < results["torch fused AdamW"])
    del params
    gc.collect()
    torch.cuda.empty_cache()


def many_small(copy_bw: float) -> None:
    from tritonbits.optim import optimizer as base

    gen = torch.Generator(device="cuda").manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(32768, generator=gen, device="cuda")) for _ in range(2000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device="cuda") * 1e-2
    make = lambda ps: tritonbits.optim.AdamW8bit(ps, lr=1e-3, weight_decay=1e-2)  # noqa: E731
    time_steps("tritonbits AdamW8bit 2000x32768, multi-tensor", make, params, step_bytes(2, 8), copy_bw)
    saved = base._multi_tensor_kernels
    base._multi_tensor_kernels = lambda device: None
    try:
        time_steps("tritonbits AdamW8bit 2000x32768, one launch per parameter", make, params, step_bytes(2, 8), copy_bw)
    finally:
        base._multi_tensor_kernels = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 0
    report(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    copy_bw = copy_bandwidth()
    report(copy_GBps=round(copy_bw / 1e9, 1))
    qmaps = (create_dynamic_map(signed=True).cuda(), create_dynamic_map(signed=False).cuda())
    check_8bit(2**24 + 123, qmaps)
    check_32bit(2**24 + 123)
    check_multi(qmaps)
    if not args.no_sweep:
        sweep(copy_bw, qmaps)
    timings(copy_bw)
    many_small(copy_bw)
    report(failures=FAILURES)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
