"""Time the 4-bit quantize/dequantize kernels over tile sizes and warps on the GPU (8192x8192 bf16).

Also the opt-in kernel options: for quantize the table's place (global, shared, split) and
``_PAIRS``; for dequantize ``_DEQUANT_VEC`` and ``_DEQUANT_SHARED_TABLE``. Prints one line per
variant: ms, fraction of a device-to-device copy, and whether the output is
bit-identical to the PyTorch reference. Run from the repository root on a CUDA machine.
"""

import itertools

import torch
from check_quant_kernels import bench_ms as ms, copy_bandwidth  # same directory

import tritonbits  # noqa: F401
from tritonbits._ops import REFERENCES
from tritonbits.backends.triton import quant_4bit as kernels




def main():
    copy_bw = copy_bandwidth()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    for quant_type, blocksize in [("nf4", 64), ("fp4", 64), ("nf4", 128)]:
        ref_packed, ref_absmax = REFERENCES["quantize_4bit"](x, blocksize, quant_type, torch.uint8)
        ref_out = REFERENCES["dequantize_4bit"](ref_packed, ref_absmax, blocksize, quant_type, [8192, 8192], x.dtype)
        q_bytes = 2 * n + n // 2 + 4 * n // blocksize
        defaults = (kernels._TILE, kernels._QUANT_WARPS, kernels._SHARED_TABLE, kernels._SPLIT_TABLE, kernels._PAIRS)
        # table: global memory, shared memory, or split in two shared-memory tables; pairs: the
        # input read as int32 words of two bfloat16 values
        tables = [(False, False, False), (True, False, False), (True, True, False), (True, False, True),
                  (True, True, True)]  # fmt: skip
        for tile, warps, (shared, split, pairs) in itertools.product([2048, 4096, 8192], [4, 8], tables):
            kernels._TILE, kernels._QUANT_WARPS = tile, warps
            kernels._SHARED_TABLE, kernels._SPLIT_TABLE, kernels._PAIRS = shared, split, pairs
            packed, absmax = kernels.quantize_4bit(x, blocksize, quant_type, torch.uint8)
            same = torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
            t = ms(lambda: kernels.quantize_4bit(x, blocksize, quant_type, torch.uint8))
            print(f"quantize   {quant_type} bs{blocksize} tile {tile:5d} warps {warps} shared table {shared:d} "
                  f"split {split:d} pairs {pairs:d}: {t:.4f} ms "
                  f"{q_bytes / (t * 1e-3) / copy_bw:6.1%} of copy  identical={same}", flush=True)
        kernels._TILE, kernels._QUANT_WARPS, kernels._SHARED_TABLE, kernels._SPLIT_TABLE, kernels._PAIRS = defaults
        defaults = (kernels._DEQUANT_ELEMENTS, kernels._DEQUANT_WARPS, kernels._DEQUANT_VEC,
                    kernels._DEQUANT_SHARED_TABLE)  # fmt: skip
        # options: bytes a thread holds in a run (0: 2-D tiles), table in shared memory
        options = [(0, False), (0, True), (4, False), (4, True), (8, True)]
        for elements, warps, (vec, shared) in itertools.product([2048, 4096, 8192], [4, 8], options):
            kernels._DEQUANT_ELEMENTS, kernels._DEQUANT_WARPS = elements, warps
            kernels._DEQUANT_VEC, kernels._DEQUANT_SHARED_TABLE = vec, shared
            out = kernels.dequantize_4bit(ref_packed, ref_absmax, blocksize, quant_type, [8192, 8192], x.dtype)
            same = torch.equal(out, ref_out)
            t = ms(lambda: kernels.dequantize_4bit(ref_packed, ref_absmax, blocksize, quant_type, [8192, 8192],
                                                   x.dtype))  # fmt: skip
            print(f"dequantize {quant_type} bs{blocksize} elems {elements:5d} warps {warps} vec {vec} shared "
                  f"table {shared:d}: {t:.4f} ms {q_bytes / (t * 1e-3) / copy_bw:6.1%} of copy  identical={same}",
                  flush=True)  # fmt: skip
        (kernels._DEQUANT_ELEMENTS, kernels._DEQUANT_WARPS, kernels._DEQUANT_VEC,
         kernels._DEQUANT_SHARED_TABLE) = defaults  # fmt: skip


if __name__ == "__main__":
    main()
