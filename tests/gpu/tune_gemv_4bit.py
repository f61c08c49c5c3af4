"""Time the fused 4-bit gemv kernel over tile configs on the GPU, beside bf16 F.linear.

One line per (shape, rows, config): ms, weight bytes / ms as a fraction of a device copy, the
speed-up over bf16, and the max error against dequantize-then-matmul. Run from the repo root.
"""

import itertools

import torch
from check_quant_kernels import bench_ms as ms, copy_bandwidth  # same directory

import tritonbits.functional as F
from tritonbits._ops import REFERENCES
from tritonbits.backends.triton import gemv_4bit as kernels




def main():
    copy_bw = copy_bandwidth()
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
        w_dq = F.dequantize_4bit(packed, state)
        weight_bytes = N * K // 2 + 4 * N * K // 64
        for rows in (1, 16):
            a = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            bf16 = ms(lambda: torch.nn.functional.linear(a, w_dq))
            ref = REFERENCES["gemv_4bit"](a, packed, [N, K], state.absmax, state.code, 64).float()
            key = "row" if rows == 1 else "rows"
            grid = itertools.product([16, 32, 64], [128, 256, 512], [4]) if rows == 1 else \
                itertools.product([32, 64, 128], [64, 128], [4])
            for config in grid:
                kernels.CONFIGS[key] = config
                try:
                    out = kernels.gemv_4bit(a, packed, [N, K], state.absmax, state.code, 64)
                    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                    t = ms(lambda: kernels.gemv_4bit(a, packed, [N, K], state.absmax, state.code, 64))
                except Exception as e:  # a config the compiler rejects (e.g. too much shared memory)
                    print(f"K={K} N={N} M={rows} {config}: error {type(e).__name__}", flush=True)
                    continue
                print(f"K={K:5d} N={N:5d} M={rows:2d} cfg={config}: {t*1e3:8.1f} us  "
                      f"{weight_bytes / (t * 1e-3) / copy_bw:6.1%} of copy  {bf16 / t:5.2f}x bf16  err {err:.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
