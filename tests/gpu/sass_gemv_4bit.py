"""Instructions per code in the hot loop of the one-row 4-bit gemv kernel, from an offline compile.

Needs no GPU: Triton compiles ``_gemv_4bit_rows_kernel`` for sm_90 with the ptxas it ships, and
the loop body (the longest backward branch of the SASS, from ``cuobjdump``) is counted by opcode.
The one-row kernel is issue-bound (Nsight Compute, H200, 2026-12-03), so fewer instructions per
code is what a faster configuration needs; this says which candidates are worth GPU time. The
count is static: it knows nothing of memory latency, occupancy or shared-memory bank conflicts
(a byte-pair table of 256 int64 entries is read with conflicts that the 16-entry table of one
lookup per code never has).

    python tests/gpu/sass_gemv_4bit.py            # a few configurations, nested and plain absmax
"""

from __future__ import annotations

import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonbits.backends.triton import gemv_4bit as kernels

_DIVISIBLE = ("N", "K", "row_stride_words", "row_stride_blocks", "stride_am", "stride_om")


def compile_rows(block_n=4, block_k=1024, warps=4, nested=True, byte_pairs=False, dtype="bf16", arch=90):
    """The compiled one-row kernel (A read as stored, no split of K) for these constexprs."""
    kernel = kernels._gemv_4bit_rows_kernel
    names = kernel.arg_names
    pointers = {"a_ptr": f"*{dtype}", "w_ptr": "*i32", "partial_ptr": "*fp32", "count_ptr": "*i32", "absmax_ptr": "*u8" if nested else "*fp32",
                "absmax_code_ptr": "*fp32", "absmax_scale_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
                "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}  # fmt: skip
    constexprs = dict(BLOCKSIZE=64, NESTED=nested, ABSMAX_BLOCKSIZE=256, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k,
                      SPLIT_K=1, USE_DOT=False, PERMUTED_A=False, NUM_STAGES=1, PREFETCH=1, HAS_BIAS=False,
                      INTERPRET=False, BYTE_PAIRS=byte_pairs)  # fmt: skip
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in _DIVISIBLE}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest loop (a label and a later branch back to it)."""
    lines = sass.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.?L\w*:$|^LBB\d+:$", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        match = re.search(r"BRA (\S+);", line)
        if match and labels.get(match.group(1), i) < i:
            body = [x.split("\t", 1)[1] for x in lines[labels[match.group(1)] + 1 : i + 1] if "\t" in x]
            best = max(best, body, key=len)
    return best


def opcode(instruction: str) -> str:
    word = instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]
    return word.split(".")[0]


def main() -> None:
    from triton.tools.disasm import get_sass

    configs = [dict(), dict(byte_pairs=True), dict(block_k=2048), dict(block_k=2048, byte_pairs=True),
               dict(block_k=4096, byte_pairs=True), dict(block_k=2048, warps=2, byte_pairs=True)]  # fmt: skip
    for nested in (True, False):
        for config in configs:
            compiled = compile_rows(nested=nested, **config)
            sass = get_sass(compiled.asm["cubin"])
            body = loop_body(sass)
            codes = config.get("block_k", 1024) * config.get("block_n", 4) // (32 * config.get("warps", 4))
            registers = max(int(r) for r in re.findall(r"\bR(\d+)\b", sass)) + 1
            ops = collections.Counter(opcode(b) for b in body).most_common(6)
            print(f"nested={nested!s:5} {config}: {len(body)} instructions for {codes} codes a thread, "
                  f"{len(body) / codes:.2f} a code; ~{registers} registers; {dict(ops)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
