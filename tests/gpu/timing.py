"""Timing helpers shared by the GPU scripts in this folder: kernel time with the host taken out
(CUDA graphs) and eager wall time per call."""

from __future__ import annotations

import time

import torch


def graph_us(fn, calls: int = 10, reps: int = 5) -> float:
    """Median GPU time of one ``fn()`` in microseconds: ``calls`` calls captured in a CUDA graph
    (after warm-up calls on a side stream), the graph replayed ``reps`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
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
