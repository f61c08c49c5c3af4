"""Where the time of a compiled 4-bit decode step goes: GPU kernels of ``generate`` by total time.

``benchmarks/e2e.py`` measured the Llama-3-8B-shaped 4-bit model decoding slower than the fused
kernels of its linear layers predict. This builds the same model (random weights, 4-bit through
``tritonbits.quantize_model``, or bf16 / bitsandbytes), warms up ``generate`` with the static
cache (transformers compiles the forward with CUDA graphs), then profiles one call and prints the
GPU kernels by total time, per generated token, and the wall time per token. Run from the
repository root: ``python tests/gpu/profile_decode.py [--variant tritonbits|bf16|bitsandbytes]``;
``--host`` profiles the host side of the call instead (cProfile), with the functions that CUDA
graph recording calls; ``--reuse-cache`` passes one kept static cache to every call, as
``benchmarks/e2e.py``'s "reused" mode does.
"""

from __future__ import annotations

import argparse
import time

import torch

from decode_setup import e2e, warmed_decode  # tests/gpu/decode_setup.py (the script's folder is on sys.path)


def _profile_host(model, input_ids, kwargs, cache) -> None:
    """Where the host's time per token goes: Python functions (and the C calls they make, such as
    a compiled frame's guard check) by own time and by cumulative time, for one generate call."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    e2e.timed_generate(model, input_ids, kwargs, cache)
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    # where a CUDA graph recording's time goes (cudagraph trees' _record, the capture's exit)
    stats.sort_stats("cumulative").print_callees(r"cudagraph_trees.py:\d+\(_record\)|graphs.py:\d+\(__exit__\)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tritonbits", choices=("tritonbits", "bf16", "bitsandbytes"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="default: all 32")
    parser.add_argument("--reuse-cache", action="store_true", help="one static cache kept for every call")
    parser.add_argument("--host", action="store_true",
                        help="profile the host instead: cProfile of one generate call, by own time")  # fmt: skip
    args = parser.parse_args()
    model, input_ids, kwargs, cache = warmed_decode(args.variant, args.batch, args.new_tokens, args.reuse_cache,
                                                    args.layers)  # fmt: skip
    seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
    per_token = 1e3 * seconds / args.new_tokens
    print(f"{args.variant} batch {args.batch}: {per_token:.2f} ms a token (wall, prefill included)")
    if args.host:
        _profile_host(model, input_ids, kwargs, cache)
        return
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        e2e.timed_generate(model, input_ids, kwargs, cache)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu_total = sum(e.self_device_time_total for e in events)
    print(f"profiled call: wall {1e3 * wall:.1f} ms, GPU kernels {gpu_total / 1e3:.1f} ms "
          f"({gpu_total / 1e3 / args.new_tokens:.2f} ms a token)")  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
