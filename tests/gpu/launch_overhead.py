"""Host time per eager call of a 4-bit layer at decode sizes, and where it goes, beside bitsandbytes.

An eager decode step calls each Linear4bit once with one row: when the host takes longer to issue
a call than the GPU takes to run it, the host sets the speed. For each shape this times, in one
process on one GPU: back-to-back calls (the rate the host can issue them, the GPU kept busy) and
the kernel alone (a CUDA graph of the same calls), for

- ``layer``: ``tritonbits.nn.Linear4bit`` (bf16, NF4, nested absmax) forward,
- ``matmul_4bit``: the functional call the layer makes,
- ``op``: ``functional.gemv_4bit`` (argument checks, then the op's Triton launcher),
- ``prepared``: the launch kept on the quant state (what matmul_4bit uses in eager mode),
- bitsandbytes' Linear4bit and bf16 ``torch.nn.Linear``.

It also checks that the prepared launch and the op give identical results. Run from the
repository root: ``python tests/gpu/launch_overhead.py [--out DIR]`` (prints a table, writes JSON).
"""

from __future__ import annotations

import sys

import torch

from timing import eager_us, graph_us, peer_bitsandbytes, script_args, write_json  # tests/gpu/timing.py (the script's folder is on sys.path)

SHAPES = ((4096, 4096), (8192, 28672))  # K, N


def main() -> int:
    args = script_args(__doc__.splitlines()[0])
    if args is None:
        return 0
    import tritonbits
    from tritonbits import functional as F
    from tritonbits.backends.triton.gemv_4bit import state_gemv_launch

    bitsandbytes = peer_bitsandbytes()
    dev = torch.device("cuda")
    rows = []
    ok = True
    torch.manual_seed(0)
    with torch.no_grad():
        for K, N in SHAPES:
            dense = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device=dev)
            layer = tritonbits.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = tritonbits.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            layer = layer.to(dev)
            weight, state = layer.weight, layer.weight.quant_state
            x = torch.randn(1, 1, K, dtype=torch.bfloat16, device=dev)
            launch = state_gemv_launch(x, weight, state)
            same = bool(torch.equal(launch.launch(x), F.gemv_4bit(x, weight.reshape(-1), state=state)))
            ok &= same
            calls = {
                "layer": lambda: layer(x),
                "matmul_4bit": lambda: tritonbits.matmul_4bit(x, weight, state),
                "op": lambda: F.gemv_4bit(x, weight.reshape(-1), state=state),
                "prepared": lambda: launch.launch(x),
                "bf16 nn.Linear": lambda: dense(x),
            }
            if bitsandbytes is not None:
                theirs = bitsandbytes.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
                theirs.weight = bitsandbytes.nn.Params4bit(
                    dense.weight.data.cpu(), requires_grad=False, quant_type="nf4"
                )
                theirs = theirs.to(dev)
                calls["bitsandbytes layer"] = lambda: theirs(x)
            for name, fn in calls.items():
                row = {"K": K, "N": N, "call": name, "eager_us": eager_us(fn), "graph_us": graph_us(fn)}
                rows.append(row)
                print(f"{K:>6}x{N:<6} {name:<20} eager {row['eager_us']:8.1f} us   kernel(s) {row['graph_us']:8.1f} us")
            print(f"{K}x{N}: prepared launch identical to the op: {same}")
    write_json(args.out, "launch_overhead.json", rows=rows, identical=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
