"""GPU check of the optimizer references against bitsandbytes' CUDA kernels (run by hand on a GPU).

    python tests/optim/gpu_check.py            # prints one line per case, exits 1 on a failure

For each update rule: one step of the tritonbits reference (TRITONBITS_BACKEND=torch) and of
bitsandbytes' CUDA kernel on the same CUDA inputs; reports max |dp| and the fraction of 8-bit codes
that differ. Expected: 32-bit |dp| at float32 rounding; 8-bit codes differ on a small fraction
(bitsandbytes' quantize_2D is not always nearest; our second moment never rounds to 0). Then the
paged-optimizer pytest on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITONBITS_BACKEND", "torch")

import torch  # noqa: E402

import tritonbits.functional as TF  # noqa: E402
from tritonbits.codebooks import create_dynamic_map  # noqa: E402

HYPER = {
    "adam": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-3),
    "ademamix": (0.9, 0.999, 0.9999, 5.0, 1e-8, 1e-3),
    "momentum": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2),
    "rmsprop": (0.99, 0.0, 0.0, 0.0, 1e-8, 1e-2),
    "adagrad": (0.0, 0.0, 0.0, 0.0, 1e-10, 1e-2),
    "lion": (0.9, 0.99, 0.0, 0.0, 0.0, 1e-4),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    try:
        import bitsandbytes.functional as BF
    except ImportError:
        print("bitsandbytes not installed: skipping the kernel comparison")
        BF = None
    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 256 * 1000
    if BF is not None:
        for name, (b1, b2, b3, alpha, eps, lr) in HYPER.items():
            for dtype in (torch.float32, torch.bfloat16):
                p = torch.randn(n, device="cuda", generator=gen).to(dtype)
                g = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype)
                rows = 2 if name == "ademamix" else 1
                s1 = torch.randn(rows * n, device="cuda", generator=gen).abs() * 0.01
                s2 = torch.rand(n, device="cuda", generator=gen) * 1e-3 if name in ("adam", "ademamix") else None
                # 32-bit
                outs = []
                for F in (TF, BF):
                    pp, ss1 = p.clone(), s1.clone().view(rows, n) if rows == 2 else s1.clone()
                    ss2 = s2.clone() if s2 is not None else None
                    F.optimizer_update_32bit(name, g.clone(), pp, ss1, b1, eps, 3, lr, ss2, b2, b3, alpha, 0.01)
                    outs.append(pp.float())
                dp = (outs[0] - outs[1]).abs().max().item()
                ok = dp <= (2e-6 if dtype == torch.float32 else 2**-6)
                failures += not ok
                print(f"32-bit {name:9s} {str(dtype):15s} max|dp|={dp:.3g} {'ok' if ok else 'FAIL'}")
                # 8-bit blockwise, starting from zero states
                q1, q2 = create_dynamic_map(True).cuda(), create_dynamic_map(False).cuda()
                outs = []
                for F in (TF, BF):
                    pp = p.clone()
                    c1 = torch.zeros((rows, n) if rows == 2 else (n,), dtype=torch.uint8, device="cuda")
                    a1 = torch.zeros((rows, n // 256) if rows == 2 else (n // 256,), device="cuda")
                    c2 = torch.zeros(n, dtype=torch.uint8, device="cuda") if s2 is not None else None
                    a2 = torch.zeros(n // 256, device="cuda") if s2 is not None else None
                    for step in (1, 2):
                        F.optimizer_update_8bit_blockwise(
                            name, g.clone(), pp, c1, c2, b1, b2, b3, alpha, eps, step, lr,
                            q1, q2 if c2 is not None else None, a1, a2, 0.01, 1.0,
                        )  # fmt: skip
                    outs.append((pp.float(), c1, a1))
                dp = (outs[0][0] - outs[1][0]).abs().max().item()
                codes = (outs[0][1] != outs[1][1]).float().mean().item()
                ok = codes < 0.01 and dp < 1e-2
                failures += not ok
                print(f"8-bit  {name:9s} {str(dtype):15s} max|dp|={dp:.3g} codes differ {codes:.2%} {'ok' if ok else 'FAIL'}")
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", os.path.join(here, "test_optimizers.py"), "-k", "paged"])
    failures += result.returncode != 0
    print("FAILURES:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
