"""GPU check of the Triton quantization kernels at real sizes: bit-identity and bandwidth.

Run on a CUDA machine from the repository root:

    python tests/gpu/check_quant_kernels.py            # everything (~80 GB GPU: includes > 2**31 cases)
    python tests/gpu/check_quant_kernels.py --no-huge  # skip the > 2**31-element cases

It calls the Triton launchers and the PyTorch references directly (whatever TRITONBITS_BACKEND
says), compares codes, absmax and decoded values with ``torch.equal``, then times each kernel
with ``triton.testing.do_bench`` (median, L2 flushed) and prints the bandwidth reached as a
fraction of a device-to-device copy. The > 2**31-element cases are compared chunk by chunk
(blocks are independent) because the reference needs int64 temporaries of the full size.
Exit status 1 if any result differs from the reference.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import tritonbits  # noqa: F401  (registers the references)
from tritonbits._ops import REFERENCES
from tritonbits.backends.registry import load_triton_launcher
from tritonbits.codebooks import dynamic_map

FAILURES: list[str] = []


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def check(name: str, got, expected) -> None:
    same = torch.equal(got, expected)
    if not same:
        differing = (got != expected).sum().item() if got.shape == expected.shape else "shape"
        FAILURES.append(f"{name}: {differing} differ")
    report(check=name, identical=same)


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second (read + write) of a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def timed(name: str, fn, bytes_moved: int, copy_bw: float, target: float | None = None) -> None:
    ms = bench_ms(fn)
    bandwidth = bytes_moved / (ms * 1e-3)
    report(
        bench=name,
        ms=round(ms, 4),
        GBps=round(bandwidth / 1e9, 1),
        fraction_of_copy=round(bandwidth / copy_bw, 3),
        target=target,
    )


def randn(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)


def check_4bit(copy_bw: float) -> None:
    quantize, dequantize = load_triton_launcher("quantize_4bit"), load_triton_launcher("dequantize_4bit")
    A = randn((8192, 8192), torch.bfloat16, 0)
    n = A.numel()
    for quant_type in ("nf4", "fp4"):
        for blocksize in (64, 128, 4096) if quant_type == "nf4" else (64,):
            for storage in (torch.uint8, torch.bfloat16) if blocksize == 64 else (torch.uint8,):
                tag = f"{quant_type}/bs{blocksize}/{storage}"
                packed, absmax = quantize(A, blocksize, quant_type, storage)
                ref_packed, ref_absmax = REFERENCES["quantize_4bit"](A, blocksize, quant_type, storage)
                check(f"quantize_4bit {tag} absmax", absmax, ref_absmax)
                check(f"quantize_4bit {tag} packed", packed.view(torch.uint8), ref_packed.view(torch.uint8))
                del ref_packed, ref_absmax
                out = dequantize(packed, absmax, blocksize, quant_type, list(A.shape), A.dtype)
                ref = REFERENCES["dequantize_4bit"](packed, absmax, blocksize, quant_type, list(A.shape), A.dtype)
                check(f"dequantize_4bit {tag}", out, ref)
                del ref, out
        packed, absmax = quantize(A, 64, quant_type, torch.uint8)
        moved = n * 2 + n // 2 + absmax.numel() * 4
        timed(f"quantize_4bit {quant_type} 8192x8192 bf16 bs64", lambda: quantize(A, 64, quant_type, torch.uint8),
              moved, copy_bw, 0.80)  # fmt: skip
        timed(f"dequantize_4bit {quant_type} 8192x8192 bf16 bs64",
              lambda: dequantize(packed, absmax, 64, quant_type, [8192, 8192], torch.bfloat16),
              moved, copy_bw, 0.85)  # fmt: skip


def check_blockwise(copy_bw: float) -> None:
    quantize, dequantize = load_triton_launcher("quantize_blockwise"), load_triton_launcher("dequantize_blockwise")
    code = dynamic_map("cuda")
    n = 2**28
    A = randn((n,), torch.float32, 1)
    for blocksize in (4096, 256, 64):
        codes, absmax = quantize(A, code, blocksize)
        ref_codes, ref_absmax = REFERENCES["quantize_blockwise"](A, code, blocksize)
        check(f"quantize_blockwise fp32 bs{blocksize} absmax", absmax, ref_absmax)
        check(f"quantize_blockwise fp32 bs{blocksize} codes", codes, ref_codes)
        del ref_codes
        out = dequantize(codes, absmax, code, blocksize, torch.float32)
        check(f"dequantize_blockwise fp32 bs{blocksize}", out, REFERENCES["dequantize_blockwise"](codes, absmax, code, blocksize, torch.float32))
        del out
        moved = n * 5 + absmax.numel() * 4
        timed(f"quantize_blockwise 2**28 fp32 bs{blocksize}", lambda: quantize(A, code, blocksize), moved, copy_bw, 0.80)
        timed(f"dequantize_blockwise 2**28 fp32 bs{blocksize}",
              lambda: dequantize(codes, absmax, code, blocksize, torch.float32), moved, copy_bw, 0.85)  # fmt: skip
    for dtype in (torch.float16, torch.bfloat16):
        B = randn((4097, 3001), dtype, 2)  # odd sizes, partial last block
        for blocksize in (64, 100, 4096):
            codes, absmax = quantize(B, code, blocksize)
            ref_codes, ref_absmax = REFERENCES["quantize_blockwise"](B, code, blocksize)
            check(f"quantize_blockwise {dtype} bs{blocksize}", codes, ref_codes)
            check(f"quantize_blockwise {dtype} bs{blocksize} absmax", absmax, ref_absmax)
            check(f"dequantize_blockwise {dtype} bs{blocksize}", dequantize(codes, absmax, code, blocksize, dtype),
                  REFERENCES["dequantize_blockwise"](codes, absmax, code, blocksize, dtype))  # fmt: skip


def check_int8(copy_bw: float) -> None:
    quant, dequant = load_triton_launcher("int8_vectorwise_quant"), load_triton_launcher("int8_vectorwise_dequant")
    for dtype in (torch.float16, torch.bfloat16):
        for shape in ((8192, 8192), (4096, 20000), (1, 8192)):
            A = randn(shape, dtype, 3)
            for threshold in (0.0, 6.0):
                out, stats, cols = quant(A, threshold)
                ref_out, ref_stats, ref_cols = REFERENCES["int8_vectorwise_quant"](A, threshold)
                tag = f"{dtype} {shape} t{threshold}"
                check(f"int8_vectorwise_quant {tag} out", out, ref_out)
                check(f"int8_vectorwise_quant {tag} stats", stats, ref_stats)
                if threshold:
                    check(f"int8_vectorwise_quant {tag} cols", cols, ref_cols)
            check(f"int8_vectorwise_dequant {dtype} {shape}", dequant(out, stats),
                  REFERENCES["int8_vectorwise_dequant"](out, stats))  # fmt: skip
    A = randn((8192, 8192), torch.float16, 4)
    out, stats, _ = quant(A, 0.0)
    timed("int8_vectorwise_quant 8192x8192 fp16", lambda: quant(A, 0.0), A.numel() * 3, copy_bw)
    timed("int8_vectorwise_dequant 8192x8192", lambda: dequant(out, stats), A.numel() * 5, copy_bw)


def check_huge() -> None:
    """Past 2**31 elements: chunked comparison against the reference (blocks are independent)."""
    chunk = 2**27
    dequantize_4bit = load_triton_launcher("dequantize_4bit")
    n_bytes = 2**31 + 2**20 + 3  # packed bytes > 2**31: 2**32 + ... elements out
    n = 2 * n_bytes
    g = torch.Generator(device="cuda").manual_seed(5)
    packed = torch.randint(0, 256, (n_bytes, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(-(n // -64), device="cuda", generator=g) + 0.5
    out = dequantize_4bit(packed, absmax, 64, "nf4", [n], torch.bfloat16)
    ok = True
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ref = REFERENCES["dequantize_4bit"](packed[start // 2 : stop // 2], absmax[start // 64 : -(stop // -64)], 64,
                                            "nf4", [stop - start], torch.bfloat16)  # fmt: skip
        ok &= torch.equal(out[start:stop], ref)
    report(check=f"dequantize_4bit {n} elements (> 2**32)", identical=ok)
    if not ok:
        FAILURES.append("dequantize_4bit huge")
    del out, packed, absmax

    quantize_4bit = load_triton_launcher("quantize_4bit")
    n = 2**31 + 2**16 + 1  # odd, past 2**31
    A = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(generator=g)
    packed, absmax = quantize_4bit(A, 64, "fp4", torch.uint8)
    ok = True
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ref_packed, ref_absmax = REFERENCES["quantize_4bit"](A[start:stop], 64, "fp4", torch.uint8)
        ok &= torch.equal(packed[start // 2 : -(stop // -2)], ref_packed) and torch.equal(
            absmax[start // 64 : -(stop // -64)], ref_absmax
        )
    report(check=f"quantize_4bit {n} elements (> 2**31)", identical=ok)
    if not ok:
        FAILURES.append("quantize_4bit huge")
    del packed, absmax

    quantize_blockwise = load_triton_launcher("quantize_blockwise")
    dequantize_blockwise = load_triton_launcher("dequantize_blockwise")
    code = dynamic_map("cuda")
    codes, absmax = quantize_blockwise(A, code, 4096)
    out = dequantize_blockwise(codes, absmax, code, 4096, torch.bfloat16)
    del A
    ok_q = ok_d = True
    for start in range(0, n, chunk):  # chunk is a multiple of 4096
        stop = min(n, start + chunk)
        block_slice = slice(start // 4096, -(stop // -4096))
        ok_d &= torch.equal(
            out[start:stop],
            REFERENCES["dequantize_blockwise"](codes[start:stop], absmax[block_slice], code, 4096, torch.bfloat16),
        )
    # Re-quantizing the decoded bf16 values is an independent second check of quantize past 2**31.
    codes2, absmax2 = quantize_blockwise(out, code, 4096)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ref_codes, ref_absmax = REFERENCES["quantize_blockwise"](out[start:stop], code, 4096)
        ok_q &= torch.equal(codes2[start:stop], ref_codes) and torch.equal(
            absmax2[start // 4096 : -(stop // -4096)], ref_absmax
        )
    report(check=f"dequantize_blockwise {n} elements (> 2**31)", identical=ok_d)
    report(check=f"quantize_blockwise {n} elements (> 2**31)", identical=ok_q)
    if not (ok_d and ok_q):
        FAILURES.append("blockwise huge")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-huge", action="store_true", help="skip the > 2**31-element cases")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_quant_kernels: no CUDA device; nothing to check", file=sys.stderr)
        return 0
    import triton

    report(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    copy_bw = copy_bandwidth()
    report(copy_GBps=round(copy_bw / 1e9, 1))
    check_4bit(copy_bw)
    torch.cuda.empty_cache()
    check_blockwise(copy_bw)
    torch.cuda.empty_cache()
    check_int8(copy_bw)
    torch.cuda.empty_cache()
    if not args.no_huge:
        check_huge()
    report(failures=FAILURES)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
