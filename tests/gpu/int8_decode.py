"""LLM.int8() layers at decode sizes: host time per eager call and kernel time, beside bitsandbytes.

For each weight shape (K x N), row count and outlier threshold this times, in one process on one
GPU, ``tritonbits.nn.Linear8bitLt`` (inference: has_fp16_weights=False, fused int8_mixed_linear
kernel for up to 16 rows), bitsandbytes' Linear8bitLt and fp16 ``torch.nn.Linear``: back-to-back
eager calls (the rate the host issues them with the GPU kept busy) and a CUDA graph of the same
calls (the kernels alone; "n/a" where the call cannot be captured, e.g. a host sync). Activations
are float16 N(0, 1), so at threshold 6 outlier columns are rare: the path, not the outlier
product, is timed. Also timed for tritonbits: ``launch`` (the kept launch alone, what the layer's
eager plan calls) and ``per K tile`` (the layer with A quantized by two launches of one program
per K tile, where it would otherwise use one program: ``ONE_PROGRAM_ELEMENTS``) and ``one launch``
(a small A quantized inside the product kernel: ``FUSED_A_MAX_WEIGHT``). Run from the
repository root: ``python tests/gpu/int8_decode.py [--out DIR]``.
"""

from __future__ import annotations

import sys

import torch

from timing import (
    eager_us,
    graph_us,
    peer_bitsandbytes,
    script_args,
    write_json,
)  # tests/gpu/timing.py (the script's folder is on sys.path)

SHAPES = ((4096, 4096), (8192, 28672))  # K, N
ROWS = (1, 16)
THRESHOLDS = (0.0, 6.0)


def _maybe(fn, timer):
    try:
        return timer(fn)
    except Exception as error:  # capture refused (host sync) or the library failed
        print(f"    ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
        return None


def main() -> int:
    args = script_args(__doc__.splitlines()[0])
    if args is None:
        return 0
    import tritonbits
    from tritonbits.backends.triton import int8_linear

    one_program = int8_linear.ONE_PROGRAM_ELEMENTS
    fused_a = int8_linear.FUSED_A_MAX_WEIGHT
    bitsandbytes = peer_bitsandbytes()
    dev = torch.device("cuda")
    rows_out = []
    torch.manual_seed(0)
    with torch.no_grad():
        for K, N in SHAPES:
            dense = torch.nn.Linear(K, N, bias=True, dtype=torch.float16, device=dev)
            for threshold in THRESHOLDS:
                ours = tritonbits.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=threshold)
                ours.load_state_dict(dense.state_dict())
                ours = ours.to(dev).eval()
                layers = {"tritonbits": ours, "fp16 nn.Linear": dense}
                per_tile = tritonbits.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=threshold)
                per_tile.load_state_dict(dense.state_dict())
                layers["tritonbits per K tile"] = per_tile.to(dev).eval()
                one_launch = tritonbits.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=threshold)
                one_launch.load_state_dict(dense.state_dict())
                layers["tritonbits one launch"] = one_launch.to(dev).eval()
                if bitsandbytes is not None:
                    theirs = bitsandbytes.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=threshold)
                    theirs.load_state_dict(dense.state_dict())
                    layers["bitsandbytes"] = theirs.to(dev).eval()
                inputs = {M: torch.randn(M, K, dtype=torch.float16, device=dev) for M in ROWS}
                for M, x in inputs.items():
                    ours(x)
                    plan = ours.state.__dict__.get("_eager_plan")
                    timed = dict(layers)
                    if plan is not None:
                        timed["tritonbits launch"] = (lambda launch, bias: lambda x: launch.launch(x, bias))(
                            plan[-1], ours.bias)  # fmt: skip
                    for name, layer in timed.items():
                        if name == "fp16 nn.Linear" and threshold:
                            continue
                        if name in ("tritonbits per K tile", "tritonbits one launch") and M * K > one_program:
                            continue  # the same kernels as "tritonbits"
                        int8_linear.ONE_PROGRAM_ELEMENTS = 0 if name == "tritonbits per K tile" else one_program
                        # (read when the layer's launch is built, at its first call below)
                        int8_linear.FUSED_A_MAX_WEIGHT = 1 << 40 if name == "tritonbits one launch" else fused_a
                        fn = (lambda layer, x: lambda: layer(x))(layer, x)
                        # bitsandbytes finds outlier columns with a host sync, which graph capture
                        # refuses (and a failed capture leaves the process unable to capture again).
                        capturable = not (name == "bitsandbytes" and threshold)
                        row = {"K": K, "N": N, "M": M, "threshold": threshold, "layer": name,
                               "eager_us": _maybe(fn, eager_us),
                               "graph_us": _maybe(fn, graph_us) if capturable else None}  # fmt: skip
                        rows_out.append(row)
                        fmt = lambda v: "     n/a" if v is None else f"{v:8.1f}"  # noqa: E731
                        int8_linear.ONE_PROGRAM_ELEMENTS = one_program
                        int8_linear.FUSED_A_MAX_WEIGHT = fused_a
                        print(f"{K:>5}x{N:<6} M={M:<3} thr={threshold:<4} {name:<22} eager {fmt(row['eager_us'])} us"
                              f"   kernel(s) {fmt(row['graph_us'])} us")  # fmt: skip
    write_json(args.out, "int8_decode.json", rows=rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
