"""The tensor-core gemv's ``reduce_last`` option on the GPU: correct, and faster than atomic adds?

For 8 rows of bf16 A on the Llama-3-8B layer shapes (NF4, nested absmax, as Linear4bit stores
them), the 16-row CONFIGS entry with K-splits meeting through atomic adds (a zero fill, the
kernel, a bf16 copy) and the same entry with ``reduce_last`` (one launch): each against
dequantize-then-matmul in float32 (bound: twice bf16's epsilon times the largest output), equal
to each other within bf16 rounding, the same output on every launch, and GPU time per call from a
CUDA graph of 10 calls. Run from the repository root: ``python tests/gpu/reduce_last_check.py``.
"""

from __future__ import annotations

import sys

import torch

from timing import graph_us  # tests/gpu/timing.py (the script's folder is on sys.path)

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))  # K, N


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    import tritonbits.functional as F
    from tritonbits.backends.triton import gemv_4bit as kernels
    from tritonbits.backends.triton.quant_4bit import nested_absmax_args

    entry = next(c for c in kernels.CONFIGS if c[6])[1:]  # the tensor-core entry, without its row limit
    programs_per_sm = entry[7] if len(entry) > 7 else 1
    variants = {name: tuple(entry[:7]) + (programs_per_sm, 1, False, False, name == "reduce_last")
                for name in ("atomic", "reduce_last")}  # fmt: skip
    ok = True
    torch.manual_seed(0)
    for K, N in SHAPES[: int(sys.argv[1]) if len(sys.argv) > 1 else None]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
        a = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
        dense = F.dequantize_4bit(packed, state).float()
        expected = a.float() @ dense.t()
        scale = expected.abs().max().item()
        outs, times = {}, {}
        for name, config in variants.items():
            launch = kernels.GemvLaunch(8, N, K, a.dtype, a.device, kernels._as_words(packed), state.absmax,
                                        nested_absmax_args(state), state.code, 64, config)  # fmt: skip
            out = launch.launch(a)
            again = launch.launch(a)
            error = (out.float() - expected).abs().max().item()
            good = error <= 2 * torch.finfo(a.dtype).eps * scale and (name == "atomic" or torch.equal(out, again))
            ok &= good
            outs[name] = out
            times[name] = graph_us(lambda: launch.launch(a))
            print(f"{K}x{N} 8 rows {name:11s} split {launch.split_k}: {times[name]:7.2f} us, max error "
                  f"{error / scale:.2e} of max |out|, {'ok' if good else 'FAILED'}", flush=True)  # fmt: skip
        gap = (outs["atomic"].float() - outs["reduce_last"].float()).abs().max().item()
        close = gap <= torch.finfo(a.dtype).eps * scale
        ok &= close
        print(f"{K}x{N}: reduce_last / atomic time {times['reduce_last'] / times['atomic']:.3f}, "
              f"outputs within bf16 rounding: {close}", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
