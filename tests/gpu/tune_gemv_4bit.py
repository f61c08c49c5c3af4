"""Sweep the fused 4-bit gemv kernel's launch configurations on the GPU, beside bf16 and cuBLAS.

For each shape (K x N) and row count it times every candidate configuration (kernel time, through
a CUDA graph of 10 calls, so host overhead is excluded), checks the result against
dequantize-then-matmul, and prints the best few with the fraction of copy bandwidth reached
(weight bytes: packed codes + float32 absmax, or with ``--nested`` 8-bit absmax codes) and the speed-up over bf16 ``F.linear``. Kernels are
compiled first in parallel worker processes (they fill Triton's cache), then timed in one process.
All rows go to ``$OUT/tune_gemv_4bit.json`` (or ``--out``). Run from the repository root:

    python tests/gpu/tune_gemv_4bit.py [--quick] [--rows R ...] [--nested] [--shapes K:N,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time

import torch

from timing import graph_us  # tests/gpu/timing.py (the script's folder is on sys.path)

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))  # K, N
ROWS = (1, 2, 4, 8, 16)
BLOCKSIZE = 64


def candidates(rows: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, use_dot, permute_a[, programs_per_sm[, prefetch[,
    rows_in_thread[, byte_pairs]]]]) configurations worth timing for ``rows``."""
    out = []
    if rows <= 2:  # the CUDA-core kernel, one program per row of A; stages > 1: more tiles in flight
        for bn, bk, w, stages in itertools.product((4, 8), (2048, 4096), (4, 8), (1, 2, 3)):
            out.append((1, bn, bk, w, stages, False, True))
        for bn, bk, w in itertools.product((4, 8), (1024, 2048), (4, 8)):  # A read as stored: no permute launch
            out.append((1, bn, bk, w, 1, False, False))
        for bn, bk in itertools.product((4, 8), (1024, 2048)):  # two tiles in flight
            out.append((1, bn, bk, 4, 1, False, True, 1, 2))
    # W's rows in each thread (_gemv_4bit_rows_kernel), A permuted in float32
    for bm in sorted({1, 2, 4} & set(range(1, rows + 1))) if rows <= 16 else ():
        for bn, bk, w in itertools.product((2, 4), (1024, 2048, 4096), (2, 4, 8)):
            out.append((bm, bn, bk, w, 1, False, True, 1, 1, True))
    if rows == 1:  # the same, A read as stored (32-bit pairs of 16-bit values): no permute launch,
        # with one lookup per code or per byte (a 256-entry table of code pairs)
        for bn, bk, w, pairs in itertools.product((2, 4), (1024, 2048, 4096), (2, 4), (False, True)):
            out.append((1, bn, bk, w, 1, False, False, 1, 1, True, pairs))
    if 2 <= rows <= 8:  # CUDA cores, several rows per program sharing each decoded code
        for bm in sorted({2, min(rows, 4)}):
            for bn, bk, w in itertools.product((2, 4, 8), (1024, 2048), (4, 8)):
                out.append((bm, bn, bk, w, 1, False, True))
    if rows >= 2:  # tensor cores, one dot per code column of A permuted
        for bn, bk, w in itertools.product((64, 128), (256, 512), (4, 8)):
            out.append((16, bn, bk, w, 1, True, True))
    # tensor cores in k order, one dot per tile of one absmax block (BLOCK_K is capped at the blocksize)
    for bn, w, pps in itertools.product((64, 128, 256), (4, 8), (2, 4)):
        out.append((16, bn, 64, w, 3, True, False, pps))
    # the same with the K-splits reduced by the last split in the launch (no zero fill or conversion launch)
    for bn, w, pps in itertools.product((64, 128), (4, 8), (2, 4, 8)):
        out.append((16, bn, 64, w, 3, True, False, pps, 1, False, False, True))
    for bn, w in itertools.product((64, 128), (4, 8)):  # two tiles in flight by hand, no pipeliner stages
        out.append((16, bn, 64, w, 1, True, False, 4, 2))
    return out


def prepared(a, packed, state, config):
    """The kernel's launch for ``config`` on this weight (built once, launched by ``.launch(a)``)."""
    from tritonbits.backends.triton import gemv_4bit as kernels
    from tritonbits.backends.triton.quant_4bit import nested_absmax_args

    N, K = state.shape
    return kernels.GemvLaunch(a.shape[0], N, K, a.dtype, a.device, kernels._as_words(packed), state.absmax,
                              nested_absmax_args(state), state.code, BLOCKSIZE, config)  # fmt: skip


NESTED = "--nested" in sys.argv  # read by the compile workers too (spawned with the same arguments)


def _inputs(K: int, N: int, rows: int, seed: int = 0):
    import tritonbits.functional as F

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K**-0.5
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=BLOCKSIZE, compress_statistics=NESTED)
    a = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16, generator=g)
    return packed, state, a


def _warm(jobs) -> int:
    """Worker: compile (run once) each (K, N, rows, config); returns how many failed."""
    failed = 0
    cache = {}
    for K, N, rows, config in jobs:
        if (K, N, rows) not in cache:
            cache = {(K, N, rows): _inputs(K, N, rows)}
        packed, state, a = cache[(K, N, rows)]
        try:
            prepared(a, packed, state, config).launch(a)
        except Exception:  # rejected configs are reported in the timing pass
            failed += 1
    torch.cuda.synchronize()
    return failed


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    us = graph_us(lambda: y.copy_(x), calls=5)
    return 2 * x.numel() * 4 / (us * 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two shapes, rows 1 and 16")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rows", type=int, nargs="+", help="row counts to sweep (default: all, or 1 and 16 with --quick)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--nested", action="store_true", help="8-bit absmax codes (the Linear4bit default)")
    parser.add_argument("--shapes", help="K:N,K:N,... instead of the default shapes (e.g. a model's layers)")
    args = parser.parse_args()
    shapes = SHAPES[:1] + SHAPES[-1:] if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in shape.split(":")) for shape in args.shapes.split(","))
    rows_list = tuple(args.rows) if args.rows else (1, 16) if args.quick else ROWS

    jobs = [(K, N, rows, c) for K, N in shapes for rows in rows_list for c in candidates(rows)]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    chunks = [jobs[i :: args.workers] for i in range(args.workers)]
    with ctx.Pool(args.workers) as pool:
        failed = sum(pool.map(_warm, chunks))
    print(f"compiled {len(jobs)} (shape, rows, config) jobs in {time.time() - t0:.0f} s, {failed} failed", flush=True)

    import tritonbits.functional as F

    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    try:
        sys.path.insert(0, "/tmp/site")
        import bitsandbytes
        import bitsandbytes.functional as bnbF
    except Exception:
        bitsandbytes = None
    records = []
    for K, N in shapes:
        weight_bytes = N * K // 2 + (1 if args.nested else 4) * N * K // BLOCKSIZE
        for rows in rows_list:
            packed, state, a = _inputs(K, N, rows)
            dense = F.dequantize_4bit(packed, state)
            expected = torch.nn.functional.linear(a.float(), dense.float())
            scale = expected.abs().max().item()
            bf16 = graph_us(lambda: torch.nn.functional.linear(a, dense))
            dequant = graph_us(lambda: torch.nn.functional.linear(a, F.dequantize_4bit(packed, state)))
            base = {"K": K, "N": N, "rows": rows, "bf16_us": bf16, "dequant_cublas_us": dequant}
            if bitsandbytes is not None:
                try:
                    bnb_packed, bnb_state = bnbF.quantize_4bit(dense, quant_type="nf4", blocksize=BLOCKSIZE,
                                                               compress_statistics=args.nested)
                    base["bnb_us"] = graph_us(lambda: bitsandbytes.matmul_4bit(a, bnb_packed.t(), bnb_state))
                except Exception as e:
                    base["bnb_error"] = repr(e)[:200]
            results = []
            for config in candidates(rows):
                try:
                    launch = prepared(a, packed, state, config)
                    out = launch.launch(a)
                    err = (out.float() - expected).abs().max().item() / scale
                    us = graph_us(lambda: launch.launch(a))
                except Exception as e:
                    records.append({**base, "config": config, "error": repr(e)[:200]})
                    continue
                rec = {**base, "config": config, "us": us, "err": err, "fraction_of_copy": weight_bytes / (us * 1e-6) / copy_bw,
                       "x_bf16": bf16 / us}
                records.append(rec)
                results.append(rec)
            results.sort(key=lambda r: r["us"])
            extra = f"  bnb {base['bnb_us']:.1f} us" if "bnb_us" in base else ""
            print(f"K={K:5d} N={N:5d} M={rows:2d}: bf16 {bf16:7.1f} us  dequant+cuBLAS {dequant:7.1f} us{extra}", flush=True)
            for r in results[:3]:
                print(f"    {r['us']:7.1f} us  {r['fraction_of_copy']:6.1%} of copy  {r['x_bf16']:5.2f}x bf16  "
                      f"err {r['err']:.1e}  {r['config']}", flush=True)
            bad = [r for r in results if r["err"] > 2 * 2**-7]
            if bad:
                print(f"    {len(bad)} configs exceed the error bound, e.g. {bad[0]['config']} err {bad[0]['err']:.1e}")
    # Best single config per row count: the highest geometric-mean speed over the shapes.
    summary = {}
    for rows in rows_list:
        by_config = {}
        for r in records:
            if r["rows"] == rows and "us" in r and r["err"] <= 2 * 2**-7:
                by_config.setdefault(tuple(r["config"]), []).append(r["bf16_us"] / r["us"])
        scored = [(torch.tensor(v).log().mean().exp().item(), c) for c, v in by_config.items() if len(v) == len(shapes)]
        if scored:
            best = max(scored)
            summary[rows] = {"config": best[1], "geomean_x_bf16": best[0]}
            print(f"rows {rows:2d}: best overall {best[1]} geomean {best[0]:.2f}x bf16", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"tune_gemv_4bit{'_nested' if args.nested else ''}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": copy_bw, "nested": args.nested,
                   "records": records, "best": summary}, f, indent=1)


if __name__ == "__main__":
    main()
