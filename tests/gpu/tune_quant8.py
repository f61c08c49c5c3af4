"""Time the blockwise 8-bit quantize kernel (bucketed code search) and 8-bit optimizer steps on the GPU.

Run on a CUDA machine from the repository root (about 2 minutes, 14 GB of GPU memory):

    python tests/gpu/tune_quant8.py [--optim-only | --quant-only]   # one of the two parts alone

1. Copy bandwidth: a device-to-device copy of 1 GiB (read + write bytes / time).
2. Bit-identity: for every variant timed below, 2**22 + 123 elements (a partial last block) of
   float32 and bfloat16 with a NaN in one block, against the PyTorch reference on the GPU, with
   three codes: the dynamic map (sorted: rank = index), a shuffled random code (the ``order``
   gather) and a crowded code (the binary-search path for crowded groups).
3. quantize_blockwise of 2**28 float32 and 2**27 bfloat16 values, blocksize 4096 and 256: for
   each (elements per program, warps, register cap ``_QUANT_MAXNREG``: None = the compiler's
   choice; ``_VEC`` and ``_SHARED_SEARCH``, the opt-in layout and shared-memory search) the
   median of 20 calls after 5 warm-ups (CUDA events) and the fraction of copy bandwidth reached
   at bytes = input + codes + absmax. The best variant of each case is marked; the old tree-walk
   kernel (embedded below) is timed with its settings.
4. ``tritonbits.optim.AdamW8bit``, ``Lion8bit`` and ``SGD8bit`` (momentum) ``.step()`` on 16
   float32 parameters of 4096x16384 with gradients: median of 10 steps after 3 warm-ups for each
   (state blocks per program, warps) in ``OPTIM_VARIANTS``, and the fraction of copy bandwidth at
   the bytes per parameter the step moves. Before each timing, a bit-identity check of that
   variant's 8-bit adam (gnorm_scale 1 and 0.5), lion and momentum updates against the reference
   (a partial last block; and a size of whole programs, the unmasked variant), once with a finite
   gradient and once with one NaN in it, reported apart.

Prints one line per measurement; exit status 1 if any check differs.
"""

from __future__ import annotations

import statistics
import sys

import torch
import triton
import triton.language as tl

import tritonbits  # registers the references
import tritonbits.optim
from tritonbits._ops import REFERENCES
from tritonbits.backends.triton import optim as optim_kernels
from tritonbits.backends.triton import quant_blockwise as kernels
from tritonbits.codebooks import create_dynamic_map

FAILURES: list[str] = []


def median_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second (read + write) of a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


# ---------------------------------------------------------------------------------------------
# the previous kernel (8-level Eytzinger tree walk), for the baseline timing


@triton.jit
def _tree_kernel(a_ptr, tree_ptr, order_ptr, codes_ptr, absmax_ptr, n, n_blocks, BLOCKSIZE: tl.constexpr,
                 BLOCK_PAD: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):  # fmt: skip
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_PAD)
    offsets = blocks[:, None] * BLOCKSIZE + cols[None, :]
    mask = (cols[None, :] < BLOCKSIZE) & (offsets < n)
    x = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, 1.1754943508222875e-38))
    scaled = x * inverse[:, None]
    node = tl.full(scaled.shape, 1, tl.int32)
    for _ in tl.static_range(8):
        node = 2 * node + 1 - (scaled <= tl.load(tree_ptr + node)).to(tl.int32)
    tl.store(codes_ptr + offsets, tl.load(order_ptr + (node - 256)), mask=mask)


def tree_tables(code: torch.Tensor):
    layout, keys = [0] * 256, iter(range(255))

    def fill(node: int) -> None:
        if node < 256:
            fill(2 * node)
            layout[node] = next(keys)
            fill(2 * node + 1)

    fill(1)
    sorted_code, order = torch.sort(code.float(), stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return midpoints[torch.tensor(layout, device=code.device)].contiguous(), order.to(torch.uint8)


def tree_quantize(A: torch.Tensor, tables, blocksize: int):
    n = A.numel()
    n_blocks = -(n // -blocksize)
    codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(n_blocks, device=A.device)
    per_program = max(1, 4096 // blocksize)
    _tree_kernel[(triton.cdiv(n_blocks, per_program),)](
        A, *tables, codes, absmax, n, n_blocks, BLOCKSIZE=blocksize, BLOCK_PAD=blocksize,
        BLOCKS_PER_PROGRAM=per_program, num_warps=8 if blocksize * per_program >= 8192 else 4,
    )  # fmt: skip
    return codes, absmax


# ---------------------------------------------------------------------------------------------
# quantize_blockwise

CASES = [(torch.float32, 2**28, 4096), (torch.float32, 2**28, 256), (torch.bfloat16, 2**27, 4096),
         (torch.bfloat16, 2**27, 256)]  # fmt: skip


def variants(blocksize: int, dtype: torch.dtype) -> list[tuple]:
    """(elements per program, warps, register cap, VEC, shared search) to try: a program holds
    whole blocks.

    The caps matter at 16 elements per thread (about 75 registers uncapped: 3 programs of 8 warps
    per SM; 64: 4 programs, no spill on the hot path; 48: 5 programs, some spills). VEC (elements
    a thread holds in a run; None: today's layout, which converts the tile through shared memory
    for the codes' store) and the shared-memory search are ``quant_blockwise._VEC`` and
    ``_SHARED_SEARCH``, both opt-in until this sweep times them.
    """
    tiles = [4096, 8192] if blocksize == 4096 else [2048, 4096, 8192]
    plain = [(tile, warps, None, None, False) for tile in tiles for warps in (4, 8)]
    capped = [(tile, warps, cap, None, False) for tile, warps, *_ in plain if tile // (32 * warps) == 16
              for cap in (64, 48)]  # fmt: skip
    vec = 4 if dtype == torch.float32 else 8
    options = [(tile, warps, None, v, shared) for tile in (4096, 8192) for warps in (4, 8)
               for v, shared in ((vec, False), (None, True), (vec, True))]  # fmt: skip
    return plain + capped + options


def set_variant(tile: int, warps: int, maxnreg, vec, shared: bool) -> None:
    kernels._TILE, kernels._QUANT_WARPS, kernels._QUANT_MAXNREG = tile, warps, maxnreg
    kernels._VEC, kernels._SHARED_SEARCH = vec, shared


def codes_to_check(gen) -> dict:
    shuffled = torch.rand(256, generator=gen, device="cuda") * 2 - 1
    crowded = create_dynamic_map(signed=True).cuda()
    crowded[200:230] = crowded[200] + torch.arange(30, device="cuda") * 2.0**-22
    return {"dynamic": create_dynamic_map(signed=True).cuda(), "shuffled": shuffled, "crowded": crowded}


def check_variant(dtype, blocksize: int, variant: tuple, codes: dict, gen) -> bool:
    set_variant(*variant)
    A = (torch.randn(2**22 + 123, generator=gen, device="cuda") * 3).to(dtype)
    A[A.numel() // 3] = float("nan")
    ok = True
    for name, code in codes.items():
        got = kernels.quantize_blockwise(A, code, blocksize)
        expected = REFERENCES["quantize_blockwise"](A, code, blocksize)
        if not (same(got[0], expected[0]) and same(got[1], expected[1])):
            ok = False
            differing = (got[0] != expected[0]).sum().item()
            FAILURES.append(
                f"quantize {dtype} bs{blocksize} (tile, warps, maxnreg, vec, shared) {variant} code {name}: "
                f"{differing} codes differ, absmax same: {same(got[1], expected[1])}"
            )
    return ok


def time_quantize(copy_bw: float) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    codes = codes_to_check(gen)
    code = create_dynamic_map(signed=True).cuda()
    defaults = (kernels._TILE, kernels._QUANT_WARPS, kernels._QUANT_MAXNREG, kernels._VEC, kernels._SHARED_SEARCH)
    for dtype, n, blocksize in CASES:
        A = (torch.randn(n, generator=gen, device="cuda") * 3).to(dtype)
        bytes_moved = A.numel() * A.element_size() + n + 4 * (n // blocksize)
        label = f"quantize {str(dtype)[6:]:8s} n=2**{n.bit_length() - 1} bs{blocksize:<5d}"
        results = []
        for variant in variants(blocksize, dtype):
            identical = check_variant(dtype, blocksize, variant, codes, gen)
            set_variant(*variant)
            ms = median_ms(lambda A=A, blocksize=blocksize: kernels.quantize_blockwise(A, code, blocksize))
            fraction = bytes_moved / (ms * 1e-3) / copy_bw
            tile, warps, maxnreg, vec, shared = variant
            name = f"tile {tile:5d} warps {warps} maxnreg {str(maxnreg):4s} vec {str(vec):4s} shared {shared!s:5s}"
            results.append((ms, name))
            print(f"{label} {name}: {ms:7.4f} ms {fraction:6.1%} of copy identical={identical}", flush=True)
        ms, name = min(results)
        print(f"{label} BEST {name}: {ms:.4f} ms {bytes_moved / (ms * 1e-3) / copy_bw:.1%} of copy", flush=True)
        tables = tree_tables(code)
        tree_ms = median_ms(lambda A=A, tables=tables, blocksize=blocksize: tree_quantize(A, tables, blocksize))
        print(f"{label} old tree walk: {tree_ms:7.4f} ms {bytes_moved / (tree_ms * 1e-3) / copy_bw:6.1%} of copy "
              f"(new best {tree_ms / ms:.2f}x faster)", flush=True)  # fmt: skip
        del A
        torch.cuda.empty_cache()
    set_variant(*defaults)


# ---------------------------------------------------------------------------------------------
# 8-bit optimizers

# (state blocks per program, warps) of the fused 8-bit optimizer kernel. A block lives in one
# warp when blocks >= warps; hot-path SASS instructions per element for AdamW (sm_90, offline
# count): 143 at (1, 2), 121 at (2, 2) and (4, 4), 119 at (4, 2) and (8, 4) (~150 registers).
OPTIM_VARIANTS = [(1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 4)]
# Also timed with the requantize search in shared memory (``optim._SHARED_SEARCH``, opt-in), which
# stages 6 KiB of tables per program and state: only programs of several blocks can amortize it.
SHARED_SEARCH_VARIANTS = [(1, 2), (4, 4), (8, 8)]
# Rule -> (optimizer class, constructor arguments, bytes moved per parameter element: g read, p
# read and written, codes read and written; absmax is 1/64 byte per state).
OPTIMIZERS = {
    "adam": ("AdamW8bit", dict(lr=1e-3, weight_decay=1e-2), 4 + 8 + 4),
    "lion": ("Lion8bit", dict(lr=1e-4, weight_decay=1e-2), 4 + 8 + 2),
    "momentum": ("SGD8bit", dict(lr=1e-3, momentum=0.9), 4 + 8 + 2),
}


def check_optim_variant(blocks: int, warps: int, shared: bool = False) -> dict[str, bool]:
    """One 8-bit update of adam, lion and momentum (sizes: a partial last block, and whole
    programs: the unmasked variant) against the PyTorch reference on the GPU, bit for bit (NaN
    equal to NaN), with a finite gradient and with the same gradient holding one NaN.

    The two are reported apart, so that a mismatch on finite values cannot hide behind the NaN
    case. With the NaN, lion's and momentum's state holds it: the reference's absmax of that block
    is NaN (torch's amax), and so are momentum's p there. Returns {"finite": ok, "NaN": ok}.
    """
    optim_kernels._BLOCKS_PER_PROGRAM, optim_kernels._WARPS_8BIT = blocks, warps
    optim_kernels._SHARED_SEARCH = shared
    gen = torch.Generator(device="cuda").manual_seed(1)
    qmaps = create_dynamic_map(signed=True).cuda(), create_dynamic_map(signed=False).cuda()
    ok = {"finite": True, "NaN": True}
    for n in (2**20 + 77, 2**20):
        p = torch.randn(n, generator=gen, device="cuda")
        finite = torch.randn(n, generator=gen, device="cuda") * 1e-2
        with_nan = finite.clone()
        with_nan[n // 3] = float("nan")
        m = torch.randn(n, generator=gen, device="cuda") * 1e-2
        v = torch.rand(n, generator=gen, device="cuda") * 1e-4
        codes1, absmax1 = REFERENCES["quantize_blockwise"](m, qmaps[0], 256)
        codes2, absmax2 = REFERENCES["quantize_blockwise"](v, qmaps[1], 256)
        for case, g in (("finite", finite), ("NaN", with_nan)):
            for rule, gnorm_scale in (("adam", 1.0), ("adam", 0.5), ("lion", 1.0), ("momentum", 1.0)):
                two = rule == "adam"
                args = [p, codes1, codes2 if two else None, absmax1, absmax2 if two else None]
                ours = [None if t is None else t.clone() for t in args]
                ref = [None if t is None else t.clone() for t in args]
                for fn, (p_, c1, c2, a1, a2) in ((optim_kernels.optimizer_update_8bit_blockwise, ours),
                                                 (REFERENCES["optimizer_update_8bit_blockwise"], ref)):  # fmt: skip
                    fn(rule, g, p_, c1, c2, 0.9, 0.999, 0.0, 0.0, 1e-8, 5, 1e-3, qmaps[0], qmaps[1] if two else None,
                       a1, a2, 1e-2, gnorm_scale)  # fmt: skip
                differing, state_blocks = [], set()
                for name, a, b in zip(("p", "codes1", "codes2", "absmax1", "absmax2"), ours, ref):
                    if a is not None and not same(a, b):
                        differing.append(name)
                        where = ~((a == b) | (a.isnan() & b.isnan())) if a.is_floating_point() else a != b
                        index = where.nonzero()[:, 0]
                        state_blocks.update((index if name.startswith("absmax") else index // 256).tolist())
                if differing:
                    ok[case] = False
                    shown = sorted(state_blocks)
                    FAILURES.append(
                        f"8-bit {rule} update, {case} gradient (n={n}, gnorm_scale={gnorm_scale}, {blocks} blocks/"
                        f"program, {warps} warps, shared search {shared}) differs from the reference in {differing}, "
                        f"in {len(shown)} state "
                        f"blocks: {shown[:8]}" + (f" (the NaN is in block {n // 3 // 256})" if case == "NaN" else "")
                    )
    return ok


def time_optimizers(copy_bw: float) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(4096, 16384, generator=gen, device="cuda")) for _ in range(16)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device="cuda") * 1e-2
    numel = sum(p.numel() for p in params)
    defaults = (optim_kernels._BLOCKS_PER_PROGRAM, optim_kernels._WARPS_8BIT, optim_kernels._SHARED_SEARCH)
    variants = dict.fromkeys([defaults, *((b, w, False) for b, w in OPTIM_VARIANTS),
                              *((b, w, True) for b, w in SHARED_SEARCH_VARIANTS)])  # each once  # fmt: skip
    for rule, (cls_name, kwargs, bytes_per_param) in OPTIMIZERS.items():
        results = []
        for blocks, warps, shared in variants:
            identical = check_optim_variant(blocks, warps, shared)
            optimizer = getattr(tritonbits.optim, cls_name)(params, **kwargs)
            ms = median_ms(optimizer.step, warmup=3, reps=10)
            fraction = bytes_per_param * numel / (ms * 1e-3) / copy_bw
            results.append((ms, blocks, warps, shared))
            print(f"{cls_name} step, 16 x 4096x16384 fp32, {blocks} state blocks/program, {warps} warps, shared search "
                  f"{shared}: {ms:.2f} ms {fraction:6.1%} of copy at {bytes_per_param} B/param identical: finite "
                  f"gradient {identical['finite']}, NaN gradient {identical['NaN']}"
                  + (" (default)" if (blocks, warps, shared) == defaults else ""), flush=True)  # fmt: skip
            del optimizer
            torch.cuda.empty_cache()
        ms, blocks, warps, shared = min(results)
        print(f"{cls_name} BEST {blocks} state blocks/program, {warps} warps, shared search {shared}: {ms:.2f} ms "
              f"{bytes_per_param * numel / (ms * 1e-3) / copy_bw:.1%} of copy", flush=True)  # fmt: skip
    optim_kernels._BLOCKS_PER_PROGRAM, optim_kernels._WARPS_8BIT, optim_kernels._SHARED_SEARCH = defaults


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (1 GiB device-to-device): {copy_bw / 1e9:.0f} GB/s", flush=True)
    if "--optim-only" not in sys.argv:
        time_quantize(copy_bw)
    if "--quant-only" not in sys.argv:
        time_optimizers(copy_bw)
    print("FAILURES:\n  " + "\n  ".join(FAILURES) if FAILURES else "all checks identical", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
