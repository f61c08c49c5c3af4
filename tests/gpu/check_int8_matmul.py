"""GPU check of the int8 matmul kernels at real sizes: exactness, rounding, timings, tile sweep.

Run on a CUDA machine from the repository root (about 1 minute on an H100, 2.5 with --sweep):

    python tests/gpu/check_int8_matmul.py            # checks + timings
    python tests/gpu/check_int8_matmul.py --sweep    # also time candidate tile configs per M bucket
    python tests/gpu/check_int8_matmul.py --quick    # checks + the 4096x4096 timings only

bitsandbytes is timed beside us when it imports with a CUDA library for this GPU (put a copy of
the installed package on PYTHONPATH if the machine has none). Exit status 1 if a check fails.

Checks:
- ``int8_linear_matmul``: int32 results equal the reference (float64 product) exactly, through
  the Triton GEMM (forced) and through the launcher (which picks ``torch._int_mm`` for
  17 <= M <= 128), at M in {1, 16, 37, 4096} on 4096x4096 and 8192x28672, at odd sizes (K, N not
  multiples of 8 or of the tiles), full range (every product +-127*127 at K = 8192), strided
  and 3-d A.
- ``int8_scaled_mm`` / ``int8_mm_dequant`` in float16, bfloat16 and float32, with and without
  bias: bit-identical to the reference (what the kernels claim); the op's looser contract, one
  rounding of the output dtype (|ours - ref| <= eps(dtype) * |ref| + tiny), is printed beside.
- The M = 1 decode path replays inside a CUDA graph and gives the same result.

Timings for M in {1, 16, 4096} on 4096x4096 and 8192x28672 (K x N), microseconds:
- eager: ``triton.testing.do_bench`` median, L2 flushed before each call. At small M these are
  partly host-bound (Python + launch cost per call, printed under ``host_us_per_call``).
- graph (M <= 16): calls captured in one CUDA graph over enough weight copies to overflow L2 and
  replayed: the GPU time a decode step under CUDA graphs pays.
Compared: fp16 ``F.linear``; ours fused ``int8_scaled_mm``; ``int8_vectorwise_quant`` +
``int8_scaled_mm`` (the threshold-0 layer's work); the int32 product through our Triton GEMM and
through ``torch._int_mm``; ``torch._int_mm`` + our dequant kernel; bitsandbytes'
``int8_scaled_mm`` and ``int8_linear_matmul``. Ratios: fp16 / ours and bnb / ours (above 1: ours
is faster), and the fraction of the floor (max of weight bytes / copy bandwidth and 2*M*N*K /
the measured ``torch._int_mm`` 8192^3 rate). ``int32_path`` lines compare Triton and
``torch._int_mm`` (and fused vs ``_int_mm`` + dequant) at M from 17 to 4096: the source of the
launcher's rule.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import tritonbits.functional  # registers the references
from tritonbits._ops import REFERENCES
from tritonbits.backends.registry import load_triton_launcher
from tritonbits.backends.triton import int8_matmul as kernels

FAILURES: list[str] = []
ROWS: list[dict] = []


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_us(calls) -> float:
    """GPU microseconds per call of ``calls`` (closures), captured in one CUDA graph and replayed.

    What a decode step under CUDA graphs pays: no Python or launch overhead. Each closure should
    read its own copy of the weight, enough copies to overflow L2, so weights come from HBM.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for call in calls:
            call()  # compile / warm up outside the capture
        with torch.cuda.graph(graph):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(30):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2] * 1e3 / len(calls)


def replicas(nbytes: int) -> int:
    """Copies of a weight of ``nbytes`` that together exceed twice the L2 cache (2 to 16)."""
    return max(2, min(16, -(-2 * 50 * 2**20 // nbytes)))


def rand_int8(shape, seed: int, full_range: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    if full_range:
        signs = torch.randint(0, 2, shape, device="cuda", generator=g, dtype=torch.int8) * 2 - 1
        return signs * 127
    return torch.randint(-127, 128, shape, device="cuda", generator=g, dtype=torch.int8)


def rand_stats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(n, device="cuda", generator=g) * 4 + 0.05


class force_triton:
    """Context: int8_linear_matmul uses the Triton GEMM even where torch._int_mm would serve."""

    def __enter__(self):
        self.saved = kernels.USE_INT_MM
        kernels.USE_INT_MM = False

    def __exit__(self, *exc):
        kernels.USE_INT_MM = self.saved


def check_exact(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    same = got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(got, expected)
    if not same:
        FAILURES.append(name)
    report(check=name, identical=same)


def check_rounding(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """The kernels claim bit-identity (same float32 expression, no FMA contraction, RNE cast).

    The contract is looser: one rounding of the output dtype of the reference's float32 value,
    |got - ref| <= eps(dtype) * (|ref| + |bias|-sized terms) -- printed as well, so that a
    failure says which of the two broke.
    """
    finfo = torch.finfo(expected.dtype)
    diff = (got.float() - expected.float()).abs()
    bound = finfo.eps * expected.float().abs() + finfo.tiny
    ok = got.shape == expected.shape and got.dtype == expected.dtype
    within = ok and bool((diff <= bound).all())
    identical = ok and torch.equal(got, expected)
    if not identical:
        FAILURES.append(name)
    report(check=name, identical=identical, within_one_rounding=within,
           identical_fraction=round((got == expected).float().mean().item(), 5) if ok else 0.0)  # fmt: skip


def correctness() -> None:
    matmul = load_triton_launcher("int8_linear_matmul")
    scaled = load_triton_launcher("int8_scaled_mm")
    dequant = load_triton_launcher("int8_mm_dequant")
    ref_matmul, ref_scaled, ref_dequant = (
        REFERENCES[n] for n in ("int8_linear_matmul", "int8_scaled_mm", "int8_mm_dequant")
    )
    cases = [(M, K, N) for K, N in ((4096, 4096), (8192, 28672)) for M in (1, 16, 37, 4096)]
    cases += [(1, 999, 1000), (17, 1001, 777), (300, 4100, 333)]  # K, N not multiples of 8 or of tiles
    for seed, (M, K, N) in enumerate(cases):
        A, B = rand_int8((M, K), 10 + seed), rand_int8((N, K), 100 + seed)
        expected = ref_matmul(A, B)
        with force_triton():
            check_exact(f"int8_linear_matmul triton M={M} K={K} N={N}", matmul(A, B), expected)
        check_exact(f"int8_linear_matmul launcher M={M} K={K} N={N}", matmul(A, B), expected)
        row, col = rand_stats(M, seed), rand_stats(N, seed + 1)
        bias = torch.randn(N, device="cuda", dtype=torch.float16)
        for dtype in (torch.float16, torch.bfloat16, torch.float32) if N < 10000 else (torch.float16,):
            want = ref_dequant(expected, row, col, dtype, bias)
            check_rounding(f"int8_scaled_mm {dtype} bias M={M} K={K} N={N}", scaled(A, B, row, col, bias, dtype), want)
            check_rounding(f"int8_mm_dequant {dtype} bias M={M} N={N}", dequant(expected, row, col, dtype, bias), want)
        check_rounding(f"int8_scaled_mm fp16 M={M} K={K} N={N}", scaled(A, B, row, col), ref_scaled(A, B, row, col))
        del A, B, expected
    # Full range: every product is +-127*127, sums up to 8192 * 16129 (no int32 overflow).
    A, B = rand_int8((64, 8192), 7, full_range=True), rand_int8((256, 8192), 8, full_range=True)
    with force_triton():
        check_exact("int8_linear_matmul triton full range", matmul(A, B), ref_matmul(A, B))
    # Non-contiguous A (a column slice) and a 3-d A.
    A, B = rand_int8((32, 4096 + 64), 9)[:, 64:], rand_int8((512, 4096), 11)
    with force_triton():
        check_exact("int8_linear_matmul triton strided A", matmul(A, B), ref_matmul(A, B))
    A3 = rand_int8((2, 3, 4096), 12)
    check_exact("int8_linear_matmul 3-d A", matmul(A3, B), ref_matmul(A3, B))

    # CUDA graph: the decode path (M = 1, split-K) captures and replays.
    A, B = rand_int8((1, 4096), 13), rand_int8((4096, 4096), 14)
    row, col = rand_stats(1, 3), rand_stats(4096, 4)
    expected = scaled(A, B, row, col)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scaled(A, B, row, col)  # warm-up (compilation) outside the capture
        with torch.cuda.graph(graph):
            captured = scaled(A, B, row, col)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    check_exact("int8_scaled_mm M=1 CUDA graph replay", captured, expected)


def import_bnb():
    try:
        import bitsandbytes  # noqa: F401

        return torch.ops.bitsandbytes
    except Exception as error:  # noqa: BLE001  (any failure means: not comparable here)
        report(note=f"bitsandbytes unavailable: {error!r}")
        return None


def ceilings() -> tuple[float, float]:
    """(copy bytes/s counting read + write, torch._int_mm ops/s at 8192^3) on this GPU."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    a, b = rand_int8((8192, 8192), 1), rand_int8((8192, 8192), 2)
    int_mm_rate = 2 * 8192**3 / (bench_ms(lambda: torch._int_mm(a, b.t())) * 1e-3)
    report(ceiling_copy_GBps=round(copy_bw / 1e9), ceiling_int_mm_TOPS=round(int_mm_rate / 1e12))
    return copy_bw, int_mm_rate


def timings(shapes, bnb, copy_bw: float, int_mm_rate: float) -> None:
    matmul = load_triton_launcher("int8_linear_matmul")
    scaled = load_triton_launcher("int8_scaled_mm")
    dequant = load_triton_launcher("int8_mm_dequant")
    quant = load_triton_launcher("int8_vectorwise_quant")
    for K, N in shapes:
        W16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
        B, col = quant(W16, 0.0)[:2]
        for M in (1, 16, 4096):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            A, row = quant(x, 0.0)[:2]
            floor_s = max(N * K / copy_bw, 2 * M * N * K / int_mm_rate)
            t = {"fp16_linear": bench_ms(lambda: torch.nn.functional.linear(x, W16))}
            t["ours_scaled_mm"] = bench_ms(lambda: scaled(A, B, row, col))

            def layer():
                A_x, row_x = quant(x, 0.0)[:2]
                return scaled(A_x, B, row_x, col)

            t["ours_quant+scaled_mm"] = bench_ms(layer)
            with force_triton():
                t["ours_triton_int32"] = bench_ms(lambda: matmul(A, B))
            if M <= 16:
                copies = [B] + [B.clone() for _ in range(replicas(B.numel()) - 1)]
                W16s = [W16] + [W16.clone() for _ in range(replicas(W16.numel() * 2) - 1)]
                t["ours_scaled_mm_graph"] = graph_us([lambda b=b: scaled(A, b, row, col) for b in copies]) / 1e3
                t["fp16_linear_graph"] = graph_us(
                    [lambda w=w: torch.nn.functional.linear(x, w) for w in W16s]
                ) / 1e3
                del copies, W16s
            if M > 16:
                t["int_mm_int32"] = bench_ms(lambda: torch._int_mm(A, B.t()))
                t["int_mm+ours_dequant"] = bench_ms(lambda: dequant(torch._int_mm(A, B.t()), row, col))
            if bnb is not None:
                t["bnb_scaled_mm"] = bench_ms(lambda: bnb.int8_scaled_mm(A, B, row, col, dtype=torch.float16))
                t["bnb_int32"] = bench_ms(lambda: bnb.int8_linear_matmul(A, B))
            row_out = {"M": M, "K": K, "N": N, **{k: round(v * 1e3, 1) for k, v in t.items()}}  # microseconds
            row_out["fp16/ours_scaled_mm"] = round(t["fp16_linear"] / t["ours_scaled_mm"], 2)
            row_out["fp16/ours_quant+scaled_mm"] = round(t["fp16_linear"] / t["ours_quant+scaled_mm"], 2)
            row_out["floor_fraction_scaled_mm"] = round(floor_s * 1e3 / t["ours_scaled_mm"], 2)
            if "fp16_linear_graph" in t:
                row_out["graph fp16/ours"] = round(t["fp16_linear_graph"] / t["ours_scaled_mm_graph"], 2)
            if "bnb_scaled_mm" in t:
                row_out["bnb/ours_scaled_mm"] = round(t["bnb_scaled_mm"] / t["ours_scaled_mm"], 2)
            report(bench_us=row_out)
            ROWS.append(row_out)
            del x, A, row
        del W16, B, col


def int32_paths(shapes) -> None:
    """Triton GEMM vs torch._int_mm for the int32 product, at the M where both can serve."""
    matmul = load_triton_launcher("int8_linear_matmul")
    scaled = load_triton_launcher("int8_scaled_mm")
    dequant = load_triton_launcher("int8_mm_dequant")
    for K, N in shapes:
        B = rand_int8((N, K), 1)
        for M in (17, 64, 128, 256, 512, 1024, 4096):
            A = rand_int8((M, K), 2)
            with force_triton():
                triton_us = bench_ms(lambda: matmul(A, B)) * 1e3
            int_mm_us = bench_ms(lambda: torch._int_mm(A, B.t())) * 1e3
            row, col = rand_stats(M, 3), rand_stats(N, 4)
            fused_us = bench_ms(lambda: scaled(A, B, row, col)) * 1e3
            int_mm_dequant_us = bench_ms(lambda: dequant(torch._int_mm(A, B.t()), row, col)) * 1e3
            report(int32_path=f"M={M} K={K} N={N}", triton_us=round(triton_us, 1), int_mm_us=round(int_mm_us, 1),
                   int_mm_over_triton=round(int_mm_us / triton_us, 2), fused_scaled_us=round(fused_us, 1),
                   int_mm_dequant_us=round(int_mm_dequant_us, 1),
                   int_mm_dequant_over_fused=round(int_mm_dequant_us / fused_us, 2))  # fmt: skip


def sweep(shapes) -> None:
    """Time candidate configs of the Triton GEMM (fused dequant epilogue) per M bucket."""
    large = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st, SPLIT_K=1)
             for bm, bn, bk, w, st in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                       (128, 256, 64, 8, 4), (256, 128, 64, 8, 4))]  # fmt: skip
    mid = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st, SPLIT_K=1)
           for bm, bn, bk, w, st in ((32, 128, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4),
                                     (64, 128, 256, 4, 3), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3),
                                     (128, 64, 128, 4, 4), (32, 64, 256, 4, 4))]  # fmt: skip
    decode = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=3 if bk == 512 else 4,
                   SPLIT_K=sk)
              for bn in (16, 32, 64, 128) for bk in (128, 256, 512) for sk in (1, 2, 4)]  # fmt: skip
    for K, N in shapes:
        copies = [rand_int8((N, K), 1 + i) for i in range(replicas(N * K))]
        col = rand_stats(N, 2)
        for M in (1, 16, 64, 256, 4096):
            A, row = rand_int8((M, K), 3), rand_stats(M, 4)
            out = torch.empty(M, N, device="cuda", dtype=torch.float16)
            results = []
            for cfg in decode if M <= 16 else mid if M <= 256 else large:

                def run(B, cfg=cfg):
                    if cfg["SPLIT_K"] > 1:
                        product = torch.zeros(M, N, device="cuda", dtype=torch.int32)
                        kernels._launch(A, B, product, row, col, None, cfg, dequantize=False)
                        kernels._dequantize_into(product, row, col, None, out)
                    else:
                        kernels._launch(A, B, out, row, col, None, cfg, dequantize=True)

                try:
                    if M <= 16:
                        us = graph_us([lambda b=b: run(b) for b in copies])
                    else:
                        us = bench_ms(lambda: run(copies[0])) * 1e3
                    results.append((us, cfg))
                except Exception as error:  # noqa: BLE001  (out of shared memory etc.: skip it)
                    report(sweep_error=str(cfg), error=repr(error)[:200])
            results.sort(key=lambda r: r[0])
            chosen = kernels._config(M, N, K, A.device)
            timed = "graph" if M <= 16 else "do_bench"
            for us, cfg in results[:5]:
                report(sweep=f"M={M} K={K} N={N}", timing=timed, us=round(us, 1), config=cfg)
            chosen_us = [us for us, cfg in results if cfg == chosen]
            report(sweep=f"M={M} K={K} N={N}", chosen=chosen, chosen_us=chosen_us[0] if chosen_us else "not swept")
        del copies


def cpu_overhead() -> None:
    """Host microseconds per call, issued back to back (what eager decode pays without graphs)."""
    import time

    scaled = load_triton_launcher("int8_scaled_mm")
    A, B = rand_int8((1, 4096), 1), rand_int8((4096, 4096), 2)
    row, col = rand_stats(1, 3), rand_stats(4096, 4)
    x, W16 = torch.randn(1, 4096, device="cuda", dtype=torch.float16), torch.randn(4096, 4096, device="cuda").half()
    out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    cfg = kernels._config(1, 4096, 4096, A.device)
    calls = {
        "fp16 F.linear": lambda: torch.nn.functional.linear(x, W16),
        "triton kernel launch only": lambda: kernels._launch(A, B, out, row, col, None, cfg, dequantize=True),
        "launcher int8_scaled_mm": lambda: scaled(A, B, row, col),
        "torch.ops.tritonbits.int8_scaled_mm": lambda: torch.ops.tritonbits.int8_scaled_mm(A, B, row, col),
        "tritonbits.functional.int8_scaled_mm": lambda: tritonbits.functional.int8_scaled_mm(A, B, row, col),
    }
    for name, call in calls.items():
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(300):
            call()
        host_us = (time.perf_counter() - start) / 300 * 1e6
        torch.cuda.synchronize()
        report(host_us_per_call=name, us=round(host_us, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    parser.add_argument("--quick", action="store_true", help="timings on 4096x4096 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    import triton

    report(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    correctness()
    shapes = ((4096, 4096),) if args.quick else ((4096, 4096), (8192, 28672))
    bnb = import_bnb()
    copy_bw, int_mm_rate = ceilings()
    timings(shapes, bnb, copy_bw, int_mm_rate)
    int32_paths(shapes)
    cpu_overhead()
    if args.sweep:
        sweep(shapes)

    keys = ["fp16_linear", "ours_scaled_mm", "ours_quant+scaled_mm", "ours_triton_int32", "int_mm_int32",
            "int_mm+ours_dequant", "bnb_scaled_mm", "fp16/ours_scaled_mm", "fp16/ours_quant+scaled_mm",
            "bnb/ours_scaled_mm", "floor_fraction_scaled_mm", "fp16_linear_graph", "ours_scaled_mm_graph",
            "graph fp16/ours"]  # fmt: skip
    print("\nmicroseconds (median); ratios: above 1 means ours is faster")
    print(f"{'M':>5} {'K':>5} {'N':>6} " + " ".join(f"{k[:22]:>22}" for k in keys))
    for row in ROWS:
        cells = " ".join(f"{str(row.get(k, '-')):>22}" for k in keys)
        print(f"{row['M']:>5} {row['K']:>5} {row['N']:>6} {cells}")
    print(f"\n{len(FAILURES)} failed checks" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
