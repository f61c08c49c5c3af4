"""LLM.int8()'s inference forward for up to 16 rows in one kernel: quantize, int8 product, outliers.

``int8_mixed_linear(A, CB, SCB, bias, threshold)`` is what ``MatMul8bitLt`` computes when no
weight gradient is needed (``backends/torch/int8.py``: :func:`mixed_linear`): A cast to float16
and quantized row-wise (outliers left out), multiplied with the int8 weight CB [N, K] on int8
tensor cores, dequantized with the row scales (+ bias) in A's dtype; with a threshold, the
columns of A holding an outlier are multiplied in A's dtype against CB's dequantized columns and
added. Unfused that is 4-6 kernels, a host sync (the outlier columns are data-dependent) and
~200 us of host time per call, ten times what a 4096x4096 decode product takes on the GPU.

For up to :data:`FUSED_ROWS` rows three small launches (two for a small A, below), prepared once
per weight and row count and kept on the layer's state, do all of it with no host sync:

1. one program per K tile reads that tile of every row (A is at most 16 x K) and writes the rows'
   partial absmax and, with a threshold, the outlier-column flags and whether the tile holds any;
2. one program per K tile reduces the partial maxima and writes the tile's int8 codes, outlier
   columns zeroed (the rows' stats from program 0);
3. the product: each program owns BLOCK_N outputs of every row (BLOCK_M = 16, the smallest int8
   tensor-core tile) and streams the codes and CB through ``tl.dot`` at the weight's bandwidth;
   then, in a second loop over the K tiles, a tile flagged as holding outlier columns multiplies
   those columns of A in A's dtype against CB's columns dequantized (``CB * SCB / 127`` rounded
   to A's dtype, as the reference does), 64 columns at a time, so a call without outliers pays
   one scalar load per tile for them.

For a small A (:data:`ONE_PROGRAM_ELEMENTS`: one row of up to 16384) steps 1 and 2 are one
program holding all of A: one launch fewer, and at decode sizes a launch costs more host time
than the GPU spends on the step. With :data:`FUSED_A_MAX_WEIGHT` (opt-in) such a small A is
quantized inside the product's programs instead, each redoing the rows' absmax from all of A:
one launch a call.

A first version quantized A inside the product's K loop (one kernel): every program then redid
that work and the row reductions, 102-110 us on 8192x28672 against 85 us for the product alone,
and the per-tile outlier reductions made threshold 6.0 take 230 us. A second version took the
outliers inside the product's loop, which capped the K tile at 128 (the float32 outlier tile's
shared memory) and put a branch in the loop: threshold 6.0 took 110 us where 0.0 took 85 (H100),
with no outlier in A. The flags [K] (bool) are returned; ``MatmulLtState.idx`` is derived from
them when read.

Bit-identity: without outlier columns the result equals the reference bit for bit (the int32
product is exact; quantization and dequantization evaluate the reference's float32 expressions
in its order). The outlier product is accumulated in float32 in another order than cuBLAS'
``addmm`` and then added to the rounded int8 result in float32 and rounded once, as ``addmm``
does: within one rounding of A's dtype of the reference.

More rows, and shapes the kernels do not take, run the unfused composition on the Triton
kernels of the parts; with a threshold the outlier columns' indices must reach the host, and
the wait for them is placed after the product's launch (:func:`_unfused`).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..torch import int8 as reference
from . import cast_rtne, interpreting, round_half_even
from . import int8 as int8_quant
from . import int8_matmul
from .int8 import _chunk_absmax, _row_scale, _threshold_in_dtype
from .int8_matmul import dequantize_values
from .kept_launch import KeptLaunch, kept_launch

# Rows (A.numel() // K) up to which the fused kernel serves; BLOCK_M is 16 whatever the rows.
FUSED_ROWS = 16
# Up to this many elements of A's tile (rows and K rounded up: rows to a power of two, K to whole
# K tiles), one program finds the absmax and writes the codes (_absmax_quantize_kernel): one
# launch fewer, which at decode sizes is host time saved (H200: about 11 us per launch).
ONE_PROGRAM_ELEMENTS = 16384
# Weights (N * K) up to which such a small A is quantized inside the product kernel itself, by
# every program (one launch a call: at decode sizes a launch costs more host time, about 10 us
# on an H200 host, than the GPU spends on it; the programs' redone work grows with N). Off
# until timed on a GPU (tests/gpu/int8_decode.py times it as "tritonbits one launch").
FUSED_A_MAX_WEIGHT = 0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_WORKSPACES = 16  # (stream, thread) buffer sets kept per launch, see Int8LinearLaunch._workspace


@triton.jit
def _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K: tl.constexpr):
    """A [BLOCK_M, CHUNK] tile in A's dtype; rows past M (and columns past K) read as 0."""
    ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=(offs_m < M)[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _outlier_columns(x, threshold):
    """int32 [CHUNK]: 1 where any row of the float16 values x [BLOCK_M, CHUNK] has |x| >= threshold."""
    return tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0)


@triton.jit
def _absmax_chunks_kernel(
    a_ptr, partial_ptr, flags_ptr, tile_flags_ptr, M, K, stride_am, threshold,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, OUTLIERS: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One program per CHUNK columns of A (all rows): the rows' absmax over the chunk, outliers
    left out, to ``partial`` [chunks, BLOCK_M]; with a threshold also the outlier-column flags
    [K] and whether the chunk holds any ([chunks]; a chunk is one K tile of the product)."""
    chunk = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = chunk * CHUNK + tl.arange(0, CHUNK)
    x = _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K).to(tl.float16).to(tl.float32)
    tl.store(partial_ptr + chunk * BLOCK_M + offs_m, _chunk_absmax(x, threshold, OUTLIERS))
    if OUTLIERS:
        columns = _outlier_columns(x, threshold)
        tl.store(flags_ptr + offs_k, columns.to(tl.uint8), mask=offs_k < K)
        tl.store(tile_flags_ptr + chunk, tl.max(columns, axis=0))


@triton.jit
def _quantize_chunks_kernel(
    a_ptr, partial_ptr, q_ptr, stats_ptr, M, K, stride_am, n_chunks, threshold,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr, OUTLIERS: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One program per CHUNK columns: the rows' absmax from the partial maxima, then the chunk's
    int8 codes ``round(x * 127 / absmax)`` with outlier columns 0, to q [M, K] (row stats [M]
    written by program 0)."""
    chunk = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    chunks = tl.arange(0, CHUNKS_POW2)
    partial = tl.load(partial_ptr + chunks[:, None] * BLOCK_M + offs_m[None, :], mask=(chunks < n_chunks)[:, None],
                      other=0.0)  # fmt: skip
    absmax = tl.max(partial, axis=0)
    offs_k = chunk * CHUNK + tl.arange(0, CHUNK)
    x = _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K).to(tl.float16).to(tl.float32)
    if OUTLIERS:
        x = tl.where(_outlier_columns(x, threshold)[None, :] != 0, 0.0, x)
    q = round_half_even(x * _row_scale(absmax)[:, None], INTERPRET).to(tl.int8)
    q_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(q_ptrs, q, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])
    if chunk == 0:
        tl.store(stats_ptr + offs_m, absmax, mask=offs_m < M)


@triton.jit
def _absmax_quantize_kernel(
    a_ptr, q_ptr, stats_ptr, flags_ptr, tile_flags_ptr, M, K, stride_am, n_chunks, threshold,
    ROWS: tl.constexpr, COLUMNS: tl.constexpr, CHUNK: tl.constexpr, OUTLIERS: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Both kernels above as one program holding all of a small A, a [ROWS, COLUMNS] tile (the
    rows and K rounded up to powers of two): the rows' absmax, the outlier flags (and per CHUNK
    columns whether any), the codes. One launch instead of two, and no loop: a program looping
    over the K tiles was latency-bound (50 us for 4096 columns with a threshold, H200)."""
    offs_m = tl.arange(0, ROWS)
    offs_k = tl.arange(0, COLUMNS)
    ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    x = tl.load(ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
    x = x.to(tl.float16).to(tl.float32)
    absmax = _chunk_absmax(x, threshold, OUTLIERS)
    if OUTLIERS:
        columns = _outlier_columns(x, threshold)
        tl.store(flags_ptr + offs_k, columns.to(tl.uint8), mask=offs_k < K)
        chunks = tl.arange(0, COLUMNS // CHUNK)
        tile_flags = tl.max(tl.reshape(columns, (COLUMNS // CHUNK, CHUNK)), axis=1)
        tl.store(tile_flags_ptr + chunks, tile_flags, mask=chunks < n_chunks)
        x = tl.where(columns[None, :] != 0, 0.0, x)
    q = round_half_even(x * _row_scale(absmax)[:, None], INTERPRET).to(tl.int8)
    q_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(q_ptrs, q, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])
    tl.store(stats_ptr + offs_m, absmax, mask=offs_m < M)


@triton.jit
def _outlier_columns_product(
    acc, a_ptr, flags_ptr, cb_cols, scb, offs_m, offs_k, M, K, stride_am, inv_127, threshold,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, FUSED_A: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] float32 plus the product of A's outlier columns among offs_k with
    those columns of CB dequantized to A's dtype (acc unchanged when none of them is flagged).
    The flags are read from ``flags_ptr``, or with FUSED_A found in A itself."""
    if FUSED_A:
        x = _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K).to(tl.float16).to(tl.float32)
        columns = _outlier_columns(x, threshold)
    else:
        columns = tl.load(flags_ptr + offs_k, mask=offs_k < K, other=0)
    if tl.max(columns.to(tl.int32), axis=0) != 0:
        a = _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K)
        a = tl.where(columns[None, :] != 0, a, 0.0)
        if EVEN_K:
            cb = tl.load(cb_cols + offs_k[:, None])
        else:
            cb = tl.load(cb_cols + offs_k[:, None], mask=(offs_k < K)[:, None], other=0)
        w = cast_rtne((cb.to(tl.float32) * scb[None, :]) * inv_127, a_ptr.dtype.element_ty, INTERPRET)
        # float32 operands: float16/bfloat16 values are exact in TF32, so the products are those
        # of a 16-bit dot (whose bfloat16 form the interpreter gets wrong); float32 A needs IEEE.
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _int8_linear_kernel(
    q_ptr, stats_ptr, cb_ptr, scb_ptr, bias_ptr, out_ptr, a_ptr, flags_ptr, tile_flags_ptr,
    M, N, K, stride_cbn, stride_om, stride_am, inv_127, inv_127_sq, threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUTLIERS: tl.constexpr, OUTLIER_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, FUSED_A: tl.constexpr = False, A_ROWS: tl.constexpr = 1, A_COLUMNS: tl.constexpr = 1,
):  # fmt: skip
    """BLOCK_N outputs of every row: the int8 product of the codes q [M, K] with CB [N, K],
    dequantized (+ bias); K tiles flagged as holding outlier columns then add those columns'
    product in A's dtype, OUTLIER_K columns at a time.

    FUSED_A (a small A, one [A_ROWS, A_COLUMNS] tile as ``_absmax_quantize_kernel`` takes it):
    every program finds the rows' absmax itself from all of A and quantizes each K tile of A as
    it multiplies it (outlier flags from A's tile too), so the call is this one launch; program 0
    writes the row stats and the outlier flags for the caller. ``q_ptr`` and ``tile_flags_ptr``
    are then not read."""
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    cb_cols = cb_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_cbn  # [BLOCK_K, BLOCK_N] view of CB
    scb = tl.load(scb_ptr + offs_n % N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    outlier_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FUSED_A:
        offs_r = tl.arange(0, A_ROWS)
        offs_c = tl.arange(0, A_COLUMNS)
        a_ptrs = a_ptr + offs_r.to(tl.int64)[:, None] * stride_am + offs_c[None, :]
        a_all = tl.load(a_ptrs, mask=(offs_r < M)[:, None] & (offs_c < K)[None, :], other=0.0)
        a_all = a_all.to(tl.float16).to(tl.float32)
        absmax = _chunk_absmax(a_all, threshold, OUTLIERS)  # [A_ROWS]
        if pid_n == 0:
            tl.store(stats_ptr + offs_r, absmax, mask=offs_r < M)
            if OUTLIERS:
                tl.store(flags_ptr + offs_c, _outlier_columns(a_all, threshold).to(tl.uint8), mask=offs_c < K)
        # the rows' stats and scales on BLOCK_M rows (0 past A_ROWS)
        same_row = offs_r[None, :] == offs_m[:, None]
        row_absmax = tl.sum(tl.where(same_row, absmax[None, :], 0.0), axis=1)
        row_scale = tl.sum(tl.where(same_row, _row_scale(absmax)[None, :], 0.0), axis=1)
    for k_tile in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k_tile * BLOCK_K + ks
        if FUSED_A:  # A's tile quantized here, as _absmax_quantize_kernel does
            x = _load_a(a_ptr, offs_m, offs_k, M, K, stride_am, EVEN_K).to(tl.float16).to(tl.float32)
            if OUTLIERS:
                x = tl.where(_outlier_columns(x, threshold)[None, :] != 0, 0.0, x)
            q = round_half_even(x * row_scale[:, None], INTERPRET).to(tl.int8)
        else:
            q = _load_a(q_ptr, offs_m, offs_k, M, K, K, EVEN_K)
        if EVEN_K:
            cb = tl.load(cb_cols + offs_k[:, None])
        else:
            cb = tl.load(cb_cols + offs_k[:, None], mask=(offs_k < K)[:, None], other=0)
        acc = tl.dot(q, cb, acc, out_dtype=tl.int32)
    if OUTLIERS:
        # A loop of its own, after the product's: inside it, the float32 operands of the outlier
        # dot capped the K tile at 128 and the loop held a branch (1.6x slower on an H100 with
        # no outlier in A). Without outliers this loop is one flag load per tile.
        sub_ks = tl.arange(0, OUTLIER_K)
        for k_tile in range(0, tl.cdiv(K, BLOCK_K)):
            if FUSED_A:
                a_tile = _load_a(a_ptr, offs_m, k_tile * BLOCK_K + ks, M, K, stride_am, EVEN_K)
                flagged = tl.max(_outlier_columns(a_tile.to(tl.float16).to(tl.float32), threshold), axis=0)
            else:
                flagged = tl.load(tile_flags_ptr + k_tile)
            if flagged != 0:
                for sub in range(0, BLOCK_K // OUTLIER_K):
                    offs_k = k_tile * BLOCK_K + sub * OUTLIER_K + sub_ks
                    outlier_acc = _outlier_columns_product(
                        outlier_acc, a_ptr, flags_ptr, cb_cols, scb, offs_m, offs_k, M, K, stride_am, inv_127,
                        threshold, EVEN_K, DOT_PRECISION, INTERPRET, FUSED_A,
                    )  # fmt: skip

    if FUSED_A:
        row_stats = row_absmax
    else:
        row_stats = tl.load(stats_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = dequantize_values(acc, row_stats, scb, bias_ptr, offs_n, N, inv_127_sq, HAS_BIAS, INTERPRET)
    out = cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET)
    if OUTLIERS:
        # addmm: the rounded int8 result plus the outlier product in float32, rounded once.
        if INTERPRET:
            total = out.to(tl.float32) + outlier_acc
        else:
            total = libdevice.add_rn(out.to(tl.float32), outlier_acc)
        out = cast_rtne(total, out_ptr.dtype.element_ty, INTERPRET)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


class _Launch(KeptLaunch):
    """A kept launch whose arguments are given per call (:meth:`KeptLaunch._run`)."""

    def __call__(self, args: tuple, spec) -> None:
        self._run(args, spec)


class Int8LinearLaunch:
    """The configured kernel launches of one fused call for a weight (CB, SCB), row count and
    dtype: the rows' partial absmax (and outlier columns), the int8 codes, the product; for a
    small A the first two are one program, or with ``FUSED_A_MAX_WEIGHT`` part of the product.

    ``launch(A, bias)`` returns (output [..., N] in A's dtype, outlier flags bool [K] or None).
    Kept on the ``MatmulLtState`` by :func:`state_int8_launch`: after the first call each kernel
    is called through its compiled launcher (:class:`~.kept_launch.KeptLaunch`).
    """

    def __init__(self, rows: int, N: int, K: int, dtype: torch.dtype, device: torch.device, CB, SCB,
                 has_bias: bool, threshold: float) -> None:  # fmt: skip
        block_n = 128 if triton.cdiv(N, 128) >= int8_matmul._multiprocessors(device) else 64
        block_k = max(32, min(512, triton.next_power_of_2(K)))
        self.rows, self.N, self.K, self.dtype, self.device = rows, N, K, dtype, device
        if device.type == "cuda" and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._workspaces: dict = {}  # (stream, thread) -> buffers, see _workspace
        self.CB, self.SCB = CB, SCB
        self.outliers = threshold > 0.0
        # torch compares float16(A).abs() >= threshold in float16: the threshold rounds first.
        self.threshold = _threshold_in_dtype(threshold, torch.float16) if self.outliers else 0.0
        self.chunks = triton.cdiv(K, block_k)
        even_k = K % block_k == 0
        common = dict(BLOCK_M=16, CHUNK=block_k, OUTLIERS=self.outliers, EVEN_K=even_k)
        # (the one program's tile: powers of two, K's tiles rounded up, e.g. 11008 -> 16384)
        tile_rows, tile_columns = triton.next_power_of_2(rows), triton.next_power_of_2(self.chunks * block_k)
        self.one_program = tile_rows * tile_columns <= ONE_PROGRAM_ELEMENTS
        self.fused_a = self.one_program and N * K <= FUSED_A_MAX_WEIGHT  # the product quantizes A itself
        if self.one_program and not self.fused_a:
            self.absmax_quantize = _Launch(_absmax_quantize_kernel, (1,), dict(
                ROWS=tile_rows, COLUMNS=tile_columns, CHUNK=block_k, OUTLIERS=self.outliers,
                INTERPRET=interpreting()), 8)  # fmt: skip
        elif not self.one_program:
            self.absmax = _Launch(_absmax_chunks_kernel, (self.chunks,), common, 4)
            self.quantize = _Launch(_quantize_chunks_kernel, (self.chunks,), dict(
                common, CHUNKS_POW2=triton.next_power_of_2(self.chunks), INTERPRET=interpreting()), 4)  # fmt: skip
        self.product = _Launch(_int8_linear_kernel, (triton.cdiv(N, block_n),), dict(
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=even_k, HAS_BIAS=has_bias, OUTLIERS=self.outliers,
            OUTLIER_K=min(64, block_k), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            INTERPRET=interpreting(), FUSED_A=self.fused_a, A_ROWS=tile_rows, A_COLUMNS=tile_columns), 4)  # fmt: skip

    def launch(self, A: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        rows, N, K = self.rows, self.N, self.K
        a2d = A if A.dim() == 2 else A.reshape(rows, K)
        if a2d.stride(1) != 1:
            a2d = a2d.contiguous()
        partial, codes, stats, flags, flag_bytes, tile_flags = self._workspace()
        out = torch.empty(rows, N, device=self.device, dtype=self.dtype)
        a_spec = (a2d.data_ptr() % 16 == 0, a2d.stride(0))
        if self.one_program:
            if not self.fused_a:
                self.absmax_quantize((a2d, codes, stats, flag_bytes, tile_flags, rows, K, a2d.stride(0), self.chunks,
                                      self.threshold), a_spec)  # fmt: skip
        else:
            self.absmax((a2d, partial, flag_bytes, tile_flags, rows, K, a2d.stride(0), self.threshold), a_spec)
            self.quantize((a2d, partial, codes, stats, rows, K, a2d.stride(0), self.chunks, self.threshold), a_spec)
        args = (
            codes, stats, self.CB, self.SCB, bias if bias is not None else self.SCB, out, a2d, flag_bytes, tile_flags,
            rows, N, K, self.CB.stride(0), out.stride(0), a2d.stride(0), reference._INV_127, reference._INV_127_SQUARED,
            self.threshold,
        )  # fmt: skip
        self.product(args, (*a_spec, None if bias is None else bias.data_ptr() % 16 == 0))
        return (out if A.dim() == 2 else out.view(*A.shape[:-1], N)), flags

    def _workspace(self) -> tuple:
        """(partial absmax or None, codes, row stats, outlier flags bool or None, the flags as
        uint8, tile flags) for this call (without a threshold the last two are placeholders).

        The buffers live only from the first kernel to the product, in stream order, so a launch
        reuses them for every call from the same host thread on the same stream (with the kernels
        stubbed out on a CPU host, ``launch`` took 18.6 us with fresh buffers and 8.5 us with
        reused ones). A call from another thread or stream, which could interleave with this
        one's kernels, gets its own; a call while a CUDA graph is captured gets fresh ones (the
        graph keeps their addresses). The flags are returned and kept on the layer's state as the
        last input's: the next call's overwrite them then."""
        cuda = self.device.type == "cuda"
        if cuda and torch._C._cuda_isCurrentStreamCapturing():
            return self._new_workspace()
        key = (torch._C._cuda_getCurrentRawStream(self.device.index) if cuda else 0, threading.get_ident())
        buffers = self._workspaces.get(key)
        if buffers is None:
            if len(self._workspaces) >= _MAX_WORKSPACES:  # threads come and go: keep the recent ones
                self._workspaces.clear()  # (a call still running holds its buffers until it returns)
            buffers = self._workspaces[key] = self._new_workspace()
        return buffers

    def _new_workspace(self) -> tuple:
        device, chunks = self.device, self.chunks
        partial = None if self.one_program else torch.empty(chunks, 16, device=device, dtype=torch.float32)
        codes = torch.empty(self.rows, self.K, device=device, dtype=torch.int8)
        stats = torch.empty(self.rows, device=device, dtype=torch.float32)
        if not self.outliers:
            return partial, codes, stats, None, stats, stats
        flags = torch.empty(self.K, device=device, dtype=torch.bool)
        tile_flags = torch.empty(chunks, device=device, dtype=torch.int32)
        return partial, codes, stats, flags, flags.view(torch.uint8), tile_flags


def _fused_launch(A, CB, SCB, bias, threshold: float) -> Optional[Int8LinearLaunch]:
    """The fused launch for A's rows and dtype, or None where the kernel does not take the call."""
    K = A.shape[-1]
    N = CB.shape[0]
    rows = A.numel() // K if K else 0
    if not (0 < rows <= FUSED_ROWS and N > 0 and A.dtype in _FLOAT_DTYPES):
        return None
    if CB.dtype != torch.int8 or CB.dim() != 2 or CB.shape[1] != K or CB.stride(1) != 1:
        return None
    if SCB.dtype != torch.float32 or SCB.shape != (N,) or not SCB.is_contiguous():
        return None
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        return None
    if any(t.device != A.device for t in (CB, SCB) + ((bias,) if bias is not None else ())):
        return None
    return Int8LinearLaunch(rows, N, K, A.dtype, A.device, CB, SCB, bias is not None, threshold)


def _unfused(A, CB, SCB, bias, threshold: float):
    """The reference composition on this backend's kernels, for more rows than the fused kernels
    take. The outlier columns' indices need the host: their flags are copied to host memory
    first, and the quantize and product kernels are queued before waiting for the copy, so the
    wait overlaps the product instead of delaying its launch."""
    K = A.shape[-1]
    A2d = A.reshape(-1, K)
    A16 = A2d.to(torch.float16).contiguous()
    flags = int8_quant.outlier_column_flags(A16, threshold)
    if flags is not None and _capturing(A):
        return _unfused_without_sync(A, A2d, A16, CB, SCB, bias, threshold, flags), flags
    ready = host_flags = None
    if flags is not None:
        host_flags = flags
        if flags.is_cuda:
            host_flags = torch.empty(K, dtype=torch.bool, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
    CA, SCA = int8_quant.quantize_rows(A16, flags, threshold)
    out = int8_matmul.int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if flags is not None:
        if ready is not None:
            ready.synchronize()
        columns = torch.argwhere(host_flags).view(-1)
        if columns.numel():
            columns = columns.to(A.device, non_blocking=True)
            subB = int8_quant.int8_vectorwise_dequant(CB[:, columns].contiguous(), SCB).to(A.dtype)
            out = out.addmm(A2d[:, columns], subB.t())
    return out.view(*A.shape[:-1], CB.shape[0]), flags


def _capturing(A: torch.Tensor) -> bool:
    """Whether A's stream is being captured into a CUDA graph (no host sync allowed)."""
    return A.is_cuda and torch.cuda.is_current_stream_capturing()


def _unfused_without_sync(A, A2d, A16, CB, SCB, bias, threshold: float, flags) -> torch.Tensor:
    """:func:`_unfused` while a CUDA graph is captured (torch.compile with CUDA graphs and more
    than 16 rows): the outlier product runs over every column of CB, A's other columns zeroed,
    since which columns hold outliers cannot reach the host. Same values (the extra products are
    zeros), summed in another order; about twice the work of the int8 product."""
    CA, SCA = int8_quant.quantize_rows(A16, flags, threshold)
    out = int8_matmul.int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    weight = int8_quant.int8_vectorwise_dequant(CB, SCB).to(A.dtype)
    out = out.addmm(A2d.masked_fill(~flags, 0), weight.t())
    return out.view(*A.shape[:-1], CB.shape[0])


def int8_mixed_linear(A, CB, SCB, bias=None, threshold: float = 0.0):
    """Triton launcher of ``tritonbits::int8_mixed_linear`` (see the module docstring).

    A [..., K] float; CB int8 [N, K]; SCB float32 [N]; bias [N] or None. Returns (output [..., N]
    in A's dtype, bool [K] outlier-column flags or None when ``threshold`` is 0).
    """
    if A.numel() == 0 or CB.shape[0] == 0:
        return reference.int8_mixed_linear(A, CB, SCB, bias, threshold)
    launch = _fused_launch(A, CB, SCB, bias, threshold)
    if launch is not None:
        return launch.launch(A, bias)
    return _unfused(A, CB, SCB, bias, threshold)


def state_int8_launch(A: torch.Tensor, state, bias: Optional[torch.Tensor]) -> Optional[Int8LinearLaunch]:
    """The fused launch for A's rows and dtype on the weight (``state.CB``, ``state.SCB``) of an
    LLM.int8() ``MatmulLtState``, or None where the kernel does not take it; made on first use
    and kept on ``state`` (rebuilt when CB or SCB change, see ``kept_launch``)."""
    threshold = float(state.threshold)
    key = ("int8_mixed_linear", A.numel() // max(A.shape[-1], 1), A.dtype, A.device, threshold,
           None if bias is None else (bias.dtype, bias.shape))  # fmt: skip
    return kept_launch(state, key, state.CB, lambda: _fused_launch(A, state.CB, state.SCB, bias, threshold),
                       tensors=[state.SCB])  # fmt: skip
