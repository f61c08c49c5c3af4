"""One kernel call at a benchmark size, for Nsight Compute: warm-up calls first (compilation,
autotuning, allocator), then one call between ``cudaProfilerStart`` and ``cudaProfilerStop``.

Run under ncu with ``--profile-from-start off`` so that only that call is profiled, e.g.::

    ncu --profile-from-start off --clock-control none --kernel-name regex:gemv \\
        --section SpeedOfLight --section WarpStateStats python tests/gpu/ncu_cases.py gemv-m1

Cases (the harness's sizes): ``gemv-m1`` / ``gemv-m16``: Linear4bit's kept gemv launch, NF4
blocksize 64, float32 absmax, bf16, 8192x28672 (K x N), 1 or 16 rows; ``gemv-m1-config`` takes a
CONFIGS entry as a Python literal after the case name; ``adamw8bit``: one AdamW8bit step on one
4096x16384 float32 parameter; ``quantize-4bit``: NF4 blocksize 64 of 8192x8192 bf16;
``quantize-blockwise``: 2**28 float32, blocksize 256.
"""

from __future__ import annotations

import ast
import sys

import torch


def _gemv(rows: int, config=None):
    import tritonbits.functional as F
    from tritonbits.backends.triton import gemv_4bit as kernels

    K, N = 8192, 28672
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    a = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    if config is None:
        launch = kernels.state_gemv_launch(a, packed, state)
    else:
        launch = kernels.GemvLaunch(rows, N, K, a.dtype, a.device, kernels._as_words(packed), state.absmax, None,
                                    state.code, 64, tuple(config))  # fmt: skip
    return lambda: launch.launch(a)


def _adamw8bit():
    import tritonbits as bnb

    p = torch.nn.Parameter(torch.randn(4096, 16384, device="cuda"))
    p.grad = torch.randn_like(p) * 1e-2
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    return opt.step


def _quantize_4bit():
    import tritonbits.functional as F

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return lambda: F.quantize_4bit(x, quant_type="nf4", blocksize=64, compress_statistics=False)


def _quantize_blockwise():
    import tritonbits.functional as F

    x = torch.randn(1 << 28, device="cuda")
    return lambda: F.quantize_blockwise(x, blocksize=256)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 0
    case = sys.argv[1]
    cases = {
        "gemv-m1": lambda: _gemv(1),
        "gemv-m16": lambda: _gemv(16),
        "gemv-m1-config": lambda: _gemv(1, ast.literal_eval(sys.argv[2])),
        "adamw8bit": _adamw8bit,
        "quantize-4bit": _quantize_4bit,
        "quantize-blockwise": _quantize_blockwise,
    }
    fn = cases[case]()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
