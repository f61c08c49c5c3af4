"""Host cost of recording a CUDA graph of a decode step's linear layers, beside bf16 and bitsandbytes.

transformers' compiled decode (``torch.compile(mode="reduce-overhead")``) records a CUDA graph of
the forward, and a profiled ``generate`` call showed one such recording per call, 0.21 s with
4-bit tritonbits layers against 0.03 s with bf16 ``nn.Linear``. This builds the 224 linear layers
of a Llama-3-8B (32 x q, k, v, o, gate, up, down; one row of bf16 input each), warms them up, then
times the capture of one call of each in a CUDA graph: the calls while capturing and
``capture_end`` (the graph's instantiation) apart, and one replay. Run from the repository root:
``python tests/gpu/capture_cost.py [--out DIR]``.
"""

from __future__ import annotations

import time

import torch

from timing import peer_bitsandbytes, script_args, warm_up_for_capture, write_json  # tests/gpu/timing.py

SHAPES = ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096))
LAYERS = 32


def _layers(kind: str) -> list[torch.nn.Module]:
    import tritonbits

    out = []
    for _ in range(LAYERS):
        for K, N in SHAPES:
            dense = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            if kind == "bf16":
                out.append(dense)
                continue
            module = tritonbits.nn if kind == "tritonbits" else peer_bitsandbytes().nn
            layer = module.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = module.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
            out.append(layer.cuda())
    return out


def measure(kind: str) -> dict:
    layers = _layers(kind)
    inputs = {K: torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for K, _ in SHAPES}

    def step():
        return [layer(inputs[layer.in_features]) for layer in layers]

    with torch.no_grad():
        stream = warm_up_for_capture(step)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            t0 = time.perf_counter()
            graph.capture_begin()
            step()
            t1 = time.perf_counter()
            graph.capture_end()
            t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        start = time.perf_counter()
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        eager = (time.perf_counter() - start) / 20
    record = {"variant": kind, "layers": len(layers), "capture_calls_ms": 1e3 * (t1 - t0),
              "capture_end_ms": 1e3 * (t2 - t1), "replay_ms": 1e3 * (t4 - t3),
              "eager_step_ms": 1e3 * eager}  # fmt: skip
    print(f"{kind:12s} {len(layers)} layers: calls while capturing {record['capture_calls_ms']:7.1f} ms, "
          f"capture_end {record['capture_end_ms']:7.1f} ms, one replay {record['replay_ms']:6.2f} ms, "
          f"eager step {record['eager_step_ms']:6.2f} ms", flush=True)  # fmt: skip
    del layers
    torch.cuda.empty_cache()
    return record


def main() -> int:
    args = script_args(__doc__.splitlines()[0])
    if args is None:
        return 0
    records = [measure("tritonbits"), measure("bf16")]
    if peer_bitsandbytes() is not None:
        records.append(measure("bitsandbytes"))
    write_json(args.out, "capture_cost.json", records=records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
