"""Timing helpers shared by the GPU scripts in this folder: kernel time with the host taken out
(CUDA graphs) and eager wall time per call."""

from __future__ import annotations

import time

import torch


def warm_up_for_capture(fn, calls: int = 3) -> torch.cuda.Stream:
    """Run ``fn()`` a few times on a side stream, as CUDA graph capture requires (lazy inits,
    cuBLAS workspaces); returns that stream, which the current stream has waited for."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return stream


def graph_us(fn, calls: int = 10, reps: int = 5) -> float:
    """Median GPU time of one ``fn()`` in microseconds: ``calls`` calls captured in a CUDA graph
    (after warm-up calls on a side stream), the graph replayed ``reps`` times."""
    warm_up_for_capture(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def eager_us(fn, calls: int = 2000, warmup: int = 50) -> float:
    """Wall time per call of ``calls`` back-to-back eager calls, the GPU synchronized at both ends
    (microseconds): the rate the host can issue them while the GPU is kept busy."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def script_args(description: str):
    """The ``--out`` argument of a GPU script (default $OUT or ./out), or None without a CUDA GPU
    (then the script has nothing to measure)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return None
    return args


def peer_bitsandbytes():
    """The bitsandbytes module, or None where it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def write_json(out_dir: str, name: str, **content) -> None:
    """``out_dir/name`` with the GPU, versions and date under "meta", then ``content``."""
    import json
    import os

    import triton

    bitsandbytes = peer_bitsandbytes()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": getattr(bitsandbytes, "__version__", None),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump({"meta": meta, **content}, f, indent=1)
