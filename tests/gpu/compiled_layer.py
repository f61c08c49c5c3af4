"""What a compiled 4-bit layer runs on the GPU: kernels and their times, eager against compiled.

The end-to-end decode (benchmarks/e2e.py, static cache + ``torch.compile(mode="reduce-overhead")``)
was slower per token than the fused kernel's own time predicts. This script compiles one
Linear4bit (4096x14336, NF4, nested absmax, bf16, one row) the same way, times a call through
CUDA graphs eager and compiled, and lists the GPU kernels of one compiled call (torch.profiler),
so that extra copies or decodes inside the compiled graph show. Run from the repository root:
``python tests/gpu/compiled_layer.py``.
"""

from __future__ import annotations

import torch

from timing import graph_us  # tests/gpu/timing.py (the script's folder is on sys.path)


def main() -> None:
    import tritonbits

    torch.manual_seed(0)
    K, N = 4096, 14336
    dense = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    layer = tritonbits.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = tritonbits.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    layer = layer.cuda()
    x = torch.randn(1, 1, K, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        eager_out, compiled_out = layer(x), compiled(x)
        print("compiled output equals eager:", bool(torch.equal(eager_out, compiled_out)))
        print(f"eager layer through CUDA graphs: {graph_us(lambda: layer(x)):.1f} us")
        print(f"compiled layer through CUDA graphs: {graph_us(lambda: compiled(x)):.1f} us")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                compiled(x)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
