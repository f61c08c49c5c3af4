"""Where the wall time of one compiled ``generate`` call goes, beyond its decode steps.

``benchmarks/e2e.py`` times whole ``generate`` calls. This builds the same Llama-3-8B-shaped model
(random weights; bf16, or 4-bit through ``tritonbits.quantize_model``), warms up ``generate`` with
a static cache (transformers compiles the forward with CUDA graphs) and then, per timed call,
reports host seconds in: the eager prefill, CUDA graph recordings by cudagraph trees (how many,
and within them the capture's end), and the rest (the decode steps). Host clocks only, nothing
synchronized inside the call, so the parts are where the host waited, not GPU time.

Per decode step (the compiled forward that ``generate`` calls once a token) it also reports the
median host seconds inside the call (guards, cudagraph trees' input checks and copies, the
replay's launch), the GPU seconds between CUDA events recorded before and after it, and the host
seconds between one step's return and the next step's start (``generate``'s own work, with its
synchronization). ``--skip-guards`` then times as many calls with Dynamo's guard evaluation skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), to show what guards cost;
``--profile`` then lists the GPU kernels of one more call; ``--cprofile`` runs one more call with
Python's profiler on inside the compiled steps only and lists where their host time goes.
``--addresses`` prints, per timed call, where the new static cache's first and last layers' keys
landed (transformers allocates them during the eager prefill), to tell whether a call's CUDA graph
recordings follow new cache addresses; ``--gc`` collects garbage before every call.

    python tests/gpu/decode_call_cost.py --variant tritonbits [--reuse-cache] [--calls 3] [--skip-guards] [--profile]
        [--cprofile] [--addresses] [--gc]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import pstats
import statistics
import time
import weakref
from collections import defaultdict

import torch

from decode_setup import e2e, warmed_decode  # tests/gpu/decode_setup.py (the script's folder is on sys.path)


def _timed(owner, name: str, totals: dict) -> None:
    """Wrap ``owner.name`` so that each call adds its seconds to ``totals[name]`` and counts."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            totals[name + " calls"] += 1

    setattr(owner, name, wrapper)


class StepClock:
    """Wraps the model's compiled call (``model._compiled_call``, what ``generate`` reuses for
    every decode step): per call, host seconds inside it, a pair of CUDA events around it, and host
    seconds since the previous call returned."""

    def __init__(self, inner):
        self.inner = inner
        self.profiler: cProfile.Profile | None = None  # on only inside the calls, when set
        self.on_first_step = None  # called at a call's first step (while its cache is alive)
        self.clear()

    def clear(self) -> None:
        self.inside: list[float] = []
        self.between: list[float] = []
        self.events: list[tuple] = []
        self.last_return = None
        self.first_step_note = None

    def __call__(self, *args, **kwargs):
        if self.on_first_step is not None and not self.inside:
            self.first_step_note = self.on_first_step()
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        if self.last_return is not None:
            self.between.append(start - self.last_return)
        before.record()
        if self.profiler is not None:
            self.profiler.enable()
        out = self.inner(*args, **kwargs)
        if self.profiler is not None:
            self.profiler.disable()
        after.record()
        self.last_return = time.perf_counter()
        self.inside.append(self.last_return - start)
        self.events.append((before, after))
        return out

    def report(self) -> str:
        torch.cuda.synchronize()
        gpu = [1e-3 * a.elapsed_time(b) for a, b in self.events]

        def ms(values: list[float]) -> str:
            return f"{1e3 * statistics.median(values):.3f}" if values else "-"

        return (f"{len(self.inside)} steps, median ms: in the call {ms(self.inside)}, GPU {ms(gpu)}, "
                f"between calls {ms(self.between)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tritonbits", choices=("tritonbits", "bf16", "bitsandbytes"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--reuse-cache", action="store_true", help="one static cache kept for every call")
    parser.add_argument("--skip-guards", action="store_true", help="then as many calls with guard evaluation skipped")
    parser.add_argument("--profile", action="store_true", help="then the GPU kernels of one more call")
    parser.add_argument("--cprofile", action="store_true", help="then host functions in one more call's steps")
    parser.add_argument("--addresses", action="store_true", help="per call, where the static cache's keys landed")
    parser.add_argument("--gc", action="store_true", help="gc.collect() before every timed call")
    args = parser.parse_args()
    from torch._inductor import cudagraph_trees
    from transformers.generation import utils as generation_utils

    model, input_ids, kwargs, cache = warmed_decode(args.variant, args.batch, args.new_tokens, args.reuse_cache)
    mode = "reused" if args.reuse_cache else "static"

    totals: dict = defaultdict(float)
    _timed(cudagraph_trees.CUDAGraphTreeManager, "record_function", totals)
    _timed(cudagraph_trees.CUDAGraphNode, "_record", totals)
    _timed(torch.cuda.CUDAGraph, "capture_end", totals)
    _timed(torch.cuda.CUDAGraph, "replay", totals)
    if hasattr(generation_utils.GenerationMixin, "_prefill"):
        _timed(generation_utils.GenerationMixin, "_prefill", totals)
    if "_compiled_call" not in model.__dict__:
        raise SystemExit("generate did not compile the forward (no model._compiled_call): nothing to time per step")
    clock = model._compiled_call = StepClock(model._compiled_call)
    caches = _tracking_caches() if args.addresses else None
    if caches is not None:
        clock.on_first_step = lambda: _cache_addresses(caches[-1]()) if caches and caches[-1]() else "no static cache"
    for skip in (False, True) if args.skip_guards else (False,):
        guards = ", guards skipped" if skip else ""
        print(f"{args.variant} batch {args.batch}, {args.new_tokens} new tokens, cache {mode}{guards}:")
        for _ in range(args.calls):
            totals.clear()
            clock.clear()
            if args.gc:
                gc.collect()
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip else contextlib.nullcontext():
                seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
            parts = ", ".join(f"{k} {int(v)}" if "calls" in k else f"{k} {v:.4f}" for k, v in sorted(totals.items()))
            rest = seconds - totals["_prefill"] - totals["record_function"]
            print(f"  call {seconds:.3f} s: {parts}; rest {rest:.3f} s ({1e3 * rest / args.new_tokens:.2f} ms a token)",
                  flush=True)  # fmt: skip
            print(f"    {clock.report()}", flush=True)
            if caches is not None:
                freed = "freed" if not caches or caches[-1]() is None else "still alive"
                print(f"    {clock.first_step_note} ({freed} after the call)", flush=True)
    if args.profile:
        _profile_kernels(model, input_ids, kwargs, cache, args.new_tokens)
    if args.cprofile:
        _profile_host(clock, model, input_ids, kwargs, cache)


def _tracking_caches() -> list:
    """A list of weak references to every StaticCache made from now on (its __init__ wrapped).

    Weak, so that tracking does not keep an old cache alive while the next call allocates its
    own (which would move the new one's addresses and cause the recordings it is meant to show).
    """
    from transformers import cache_utils

    made: list = []
    original = cache_utils.StaticCache.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))
        del made[:-1]

    cache_utils.StaticCache.__init__ = init
    return made


def _cache_addresses(cache) -> str:
    layers = getattr(cache, "layers", [])
    if not layers or getattr(layers[0], "keys", None) is None:
        return "static cache: not allocated"
    first, last = layers[0], layers[-1]
    return (f"static cache keys at 0x{first.keys.data_ptr():x} (layer 0), 0x{last.keys.data_ptr():x} "
            f"(layer {len(layers) - 1}); values 0x{first.values.data_ptr():x}")  # fmt: skip


def _profile_host(clock: StepClock, model, input_ids, kwargs, cache) -> None:
    """Python's profiler inside the compiled steps of one more call: top functions by own time
    and by cumulative time (the profiler's own overhead inflates both, about alike)."""
    clock.clear()
    clock.profiler = cProfile.Profile()
    seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
    profiler, clock.profiler = clock.profiler, None
    print(f"cProfile call {seconds:.3f} s; {clock.report()}")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        print(f"--- by {order}:\n" + "\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def _profile_kernels(model, input_ids, kwargs, cache, new_tokens: int) -> None:
    """GPU kernels of one more call (CUDA activity only, so no CPU op counts them twice)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total_us = sum(e.self_device_time_total for e in events)
    print(f"profiled call {seconds:.3f} s, GPU kernels {total_us / 1e3:.1f} ms ({total_us / 1e3 / new_tokens:.3f} ms "
          f"a token); by total time:")  # fmt: skip
    for e in events[:15]:
        print(f"  {e.self_device_time_total / 1e3:9.3f} ms {e.count:6d} x {e.self_device_time_total / e.count:8.2f} us"
              f"  {e.key[:90]}")  # fmt: skip

if __name__ == "__main__":
    main()
