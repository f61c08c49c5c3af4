"""Where the wall time of one compiled ``generate`` call goes, beyond its decode steps.

``benchmarks/e2e.py`` times whole ``generate`` calls. This builds the same Llama-3-8B-shaped model
(random weights; bf16, or 4-bit through ``tritonbits.quantize_model``), warms up ``generate`` with
a static cache (transformers compiles the forward with CUDA graphs) and then, per timed call,
reports host seconds in: the eager prefill, CUDA graph recordings by cudagraph trees (how many,
and within them the capture's end), and the rest (the decode steps). Host clocks only, nothing
synchronized inside the call, so the parts are where the host waited, not GPU time.

    python tests/gpu/decode_call_cost.py --variant tritonbits [--reuse-cache] [--calls 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.getcwd())
from benchmarks import e2e  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tritonbits", choices=("tritonbits", "bf16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--reuse-cache", action="store_true", help="one static cache kept for every call")
    args = parser.parse_args()
    from torch._inductor import cudagraph_trees
    from transformers.generation import utils as generation_utils

    device = torch.device("cuda")
    model = e2e.build_model(e2e.llama_config(e2e.LLAMA3_8B), device, seed=0)
    if args.variant == "tritonbits":
        e2e.quantize_tritonbits(model)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, 16), device=device)
    mode = "reused" if args.reuse_cache else "static"
    kwargs = e2e.generate_kwargs(mode, args.new_tokens, None)
    cache = e2e.reused_cache(model, input_ids.shape[1] + args.new_tokens) if args.reuse_cache else None
    for _ in range(2):
        seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
        print(f"warm-up generate: {seconds:.2f} s", flush=True)

    totals: dict = defaultdict(float)
    _timed(cudagraph_trees.CUDAGraphTreeManager, "record_function", totals)
    _timed(cudagraph_trees.CUDAGraphNode, "_record", totals)
    _timed(torch.cuda.CUDAGraph, "capture_end", totals)
    _timed(torch.cuda.CUDAGraph, "replay", totals)
    if hasattr(generation_utils.GenerationMixin, "_prefill"):
        _timed(generation_utils.GenerationMixin, "_prefill", totals)
    print(f"{args.variant} batch {args.batch}, {args.new_tokens} new tokens, cache {mode}:")
    for _ in range(args.calls):
        totals.clear()
        seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
        parts = ", ".join(f"{k} {v:.4f}" if "calls" not in k else f"{k} {int(v)}" for k, v in sorted(totals.items()))
        rest = seconds - totals["_prefill"] - totals["record_function"]
        print(f"  call {seconds:.3f} s: {parts}; rest {rest:.3f} s ({1e3 * rest / args.new_tokens:.2f} ms a token)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
