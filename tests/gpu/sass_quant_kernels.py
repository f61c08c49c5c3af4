"""Instructions per element of the quantization kernels and their options, from an offline compile.

Needs no GPU: Triton compiles each kernel for sm_90 with the ptxas it ships and the SASS is
counted (``cuobjdump`` through ``triton.tools.disasm``). The counts are static and per thread
(every path, divided by the elements a thread holds): for quantize_4bit and dequantize_4bit that is
their one straight path; quantize_blockwise also carries its crowded-group binary search and, with
the shared-memory search, both searches (one runs), so compare its lines with each other only.
Also printed: the shared memory the compiled kernel reserves (a tile's layout conversion shows
here) and the shared- and global-memory instructions. The kernels are bound by instruction issue
or by L1 (Nsight Compute, H200), so these say which options deserve GPU time; only a timed sweep
(``tune_quant4.py``, ``tune_quant8.py --quant-only``) says which are faster.

    python tests/gpu/sass_quant_kernels.py
"""

from __future__ import annotations

import collections

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonbits.backends.triton import quant_4bit, quant_blockwise

_MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "STSM", "LDSM", "BAR")


def _compile(kernel, pointers: dict, constexprs: dict, divisible: tuple, warps: int):
    names = kernel.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in divisible}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _report(label: str, compiled, elements_a_thread: int) -> None:
    from triton.tools.disasm import get_sass

    lines = [line.split("\t", 1)[1] for line in get_sass(compiled.asm["cubin"]).splitlines() if "\t" in line]
    ops = collections.Counter((x.split()[1] if x.startswith("@") else x.split()[0]).split(".")[0] for x in lines)
    memory = " ".join(f"{op} {ops[op]}" for op in _MEMORY_OPS if ops[op])
    print(f"{label:70s} {len(lines) / elements_a_thread:6.2f} an element; shared {compiled.metadata.shared:5d} B; "
          f"{memory}", flush=True)  # fmt: skip


def quantize_4bit(dtype="bf16", blocksize=64, tile=4096, warps=4, shared=True, split=False, pairs=False, even=True):
    pointers = {"a_ptr": f"*{dtype}", "bucket_ptr": "*i64", "threshold_ptr": "*fp32", "pair_codes_ptr": "*i32",
                "packed_ptr": "*u8", "absmax_ptr": "*fp32"}  # fmt: skip
    constexprs = dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=tile // blocksize, SHARED_TABLE=shared, INTERPRET=False,
                      SPLIT_TABLE=split, PAIRS=pairs, EVEN=even)  # fmt: skip
    compiled = _compile(quant_4bit._quantize_4bit_kernel, pointers, constexprs, ("n", "n_bytes"), warps)
    _report(f"quantize_4bit {dtype} bs{blocksize} split={split} pairs={pairs} even={even}", compiled,
            tile // (32 * warps))  # fmt: skip


def dequantize_4bit(dtype="bf16", blocksize=64, elements=4096, warps=4, nested=False, vec=0, shared=False, even=True):
    pointers = {"packed_ptr": "*u8", "table_ptr": "*fp32", "absmax_ptr": "*u8" if nested else "*fp32",
                "absmax_code_ptr": "*fp32", "absmax_scale_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": f"*{dtype}"}
    constexprs = dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=elements // blocksize, NESTED=nested,
                      ABSMAX_BLOCKSIZE=256, INTERPRET=False, VEC=vec, SHARED_TABLE=shared, EVEN=even)  # fmt: skip
    compiled = _compile(quant_4bit._dequantize_4bit_kernel, pointers, constexprs, ("n", "n_bytes"), warps)
    _report(f"dequantize_4bit {dtype} bs{blocksize} nested={nested} vec={vec} shared={shared} even={even}", compiled,
            elements // (32 * warps))  # fmt: skip


def quantize_blockwise(dtype="fp32", blocksize=256, tile=4096, warps=8, vec=None, shared=False):
    pointers = {"a_ptr": f"*{dtype}", "tables_ptr": "*i32", "codes_ptr": "*u8", "absmax_ptr": "*fp32"}
    constexprs = dict(BLOCKSIZE=blocksize, BLOCK_PAD=blocksize, BLOCKS_PER_PROGRAM=tile // blocksize, INTERPRET=False,
                      VEC=vec, SHARED_SEARCH=shared)  # fmt: skip
    compiled = _compile(quant_blockwise._quantize_blockwise_kernel, pointers, constexprs, ("n",), warps)
    _report(f"quantize_blockwise {dtype} bs{blocksize} vec={vec} shared={shared} (all paths)", compiled,
            tile // (32 * warps))  # fmt: skip


def main() -> None:
    for options in (dict(even=False), dict(), dict(pairs=True), dict(split=True, pairs=True), dict(blocksize=128),
                    dict(blocksize=128, pairs=True), dict(dtype="fp16", pairs=True)):  # fmt: skip
        quantize_4bit(**options)
    for options in (dict(even=False), dict(), dict(vec=4), dict(shared=True), dict(vec=4, shared=True),
                    dict(vec=4, shared=True, nested=True), dict(vec=4, shared=True, dtype="fp32")):  # fmt: skip
        dequantize_4bit(**options)
    for options in (dict(), dict(vec=4), dict(vec=4, shared=True), dict(blocksize=4096), dict(blocksize=4096, vec=4),
                    dict(dtype="bf16"), dict(dtype="bf16", vec=8), dict(dtype="bf16", vec=8, shared=True)):  # fmt: skip
        quantize_blockwise(**options)


if __name__ == "__main__":
    main()
