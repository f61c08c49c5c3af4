"""The op registry: every tritonbits op's schema and fake (meta) implementation.

Ops live in the ``tritonbits`` namespace (``torch.ops.tritonbits.<name>``). Their schemas follow
bitsandbytes' ``torch.ops.bitsandbytes`` ops so that code written against one reads the same on
the other. Implementations are registered elsewhere, per device:

- ``backends/torch``: the pure-PyTorch reference, registered for every device ("default").
- ``backends/triton``: Triton kernels, registered for GPU devices (see ``backends/__init__.py``).

The fake implementations only compute output shapes and dtypes, so every op traces under
``torch.compile(fullgraph=True)``. Argument checking with user-facing messages happens once, in
``tritonbits.functional``; the ``torch._check`` calls here guard direct callers of the ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

NAMESPACE = "tritonbits"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES_4BIT = ("nf4", "fp4")
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
OPTIMIZERS_32BIT = ("adam", "lamb", "momentum", "lars", "rmsprop", "adagrad", "lion", "ademamix")
OPTIMIZERS_8BIT_BLOCKWISE = ("adam", "momentum", "rmsprop", "adagrad", "lion", "ademamix")

_SCHEMAS = {
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
    "gemv_4bit": "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int blocksize) -> Tensor",
    "gemv_4bit_nested": (
        "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor absmax_code, Tensor absmax_scale, "
        "Tensor offset, int absmax_blocksize, Tensor code, int blocksize) -> Tensor"
    ),
    "int8_vectorwise_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)",
    "int8_vectorwise_dequant": "(Tensor A, Tensor stats) -> Tensor",
    "int8_linear_matmul": "(Tensor A, Tensor B) -> Tensor",
    "int8_mm_dequant": (
        "(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) -> Tensor"
    ),
    "int8_double_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor?)",
    "int8_scaled_mm": (
        "(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, ScalarType? dtype=None) -> Tensor"
    ),
    "int8_mixed_linear": (
        "(Tensor A, Tensor CB, Tensor SCB, Tensor? bias=None, float threshold=0.0) -> (Tensor, Tensor?)"
    ),
    "optimizer_update_32bit": (
        "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, "
        "Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, float beta3, "
        "float alpha, float eps, float weight_decay, int step, float lr, float gnorm_scale, "
        "bool skip_zeros=False) -> ()"
    ),
    "optimizer_update_8bit_blockwise": (
        "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, "
        "float beta1, float beta2, float beta3, float alpha, float eps, int step, float lr, "
        "Tensor qmap1, Tensor? qmap2, Tensor(a6!) absmax1, Tensor(a7!)? absmax2, float weight_decay, "
        "float gnorm_scale, bool skip_zeros=False) -> ()"
    ),
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{NAMESPACE}::{_name}", _schema)


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def _fake(name: str):
    return torch.library.register_fake(qualname(name))


def _check_float(t: torch.Tensor, arg: str) -> None:
    torch._check(t.dtype in FLOAT_DTYPES, lambda: f"{arg} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_4bit_args(blocksize: int, quant_type: str) -> None:
    torch._check(blocksize in BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    torch._check(quant_type in QUANT_TYPES_4BIT, lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def num_blocks(n: int, blocksize: int) -> int:
    """Number of blocks of ``blocksize`` needed to cover ``n`` elements (the last may be partial)."""
    return -(n // -blocksize)


def packed_4bit_rows(n: int, quant_storage: torch.dtype) -> int:
    """Rows of the ``[rows, 1]`` packed 4-bit tensor holding ``n`` codes in ``quant_storage`` words.

    Two codes share a byte; a word of ``itemsize`` bytes holds ``2 * itemsize`` codes. As in
    bitsandbytes, a final partial word is dropped when ``n`` is not a multiple of ``2 * itemsize``
    (so use uint8 storage for such sizes).
    """
    return (n + 1) // (quant_storage.itemsize * 2)


@_fake("quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    _check_float(A, "A")
    absmax = A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return torch.empty_like(A, dtype=torch.uint8, memory_format=torch.contiguous_format), absmax


@_fake("dequantize_blockwise")
def _(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(A.dtype == torch.uint8, lambda: f"A must be uint8, got {A.dtype}")
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return torch.empty_like(A, dtype=dtype, memory_format=torch.contiguous_format)


@_fake("quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    _check_4bit_args(blocksize, quant_type)
    _check_float(A, "A")
    n = A.numel()
    absmax = A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32)
    packed = A.new_empty((packed_4bit_rows(n, quant_storage), 1), dtype=quant_storage)
    return packed, absmax


@_fake("dequantize_4bit")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype):
    _check_4bit_args(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return A.new_empty(shape, dtype=dtype)


def _gemv_output(A, shapeB: Sequence[int], blocksize: int):
    torch._check(blocksize in BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    _check_float(A, "A")
    torch._check(len(shapeB) == 2, lambda: f"shapeB must be [N, K], got {list(shapeB)}")
    torch._check(A.shape[-1] == shapeB[1], lambda: f"A's last dim {A.shape[-1]} must equal K = {shapeB[1]}")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


@_fake("gemv_4bit")
def _(A, B, shapeB: Sequence[int], absmax, code, blocksize: int):
    return _gemv_output(A, shapeB, blocksize)


@_fake("gemv_4bit_nested")
def _(A, B, shapeB: Sequence[int], absmax, absmax_code, absmax_scale, offset, absmax_blocksize: int, code,
      blocksize: int):  # fmt: skip
    torch._check(absmax.dtype == torch.uint8, lambda: f"absmax must be uint8 codes, got {absmax.dtype}")
    return _gemv_output(A, shapeB, blocksize)


@_fake("int8_vectorwise_quant")
def _(A: torch.Tensor, threshold: float = 0.0):
    out_row = torch.empty_like(A, dtype=torch.int8, memory_format=torch.contiguous_format)
    rows = A.numel() // A.shape[-1] if A.shape[-1] else 0
    row_stats = A.new_empty((rows,), dtype=torch.float32)
    if threshold == 0.0:
        return out_row, row_stats, None
    outliers = torch.library.get_ctx().new_dynamic_size()
    return out_row, row_stats, A.new_empty((outliers,), dtype=torch.int64)


@_fake("int8_vectorwise_dequant")
def _(A: torch.Tensor, stats: torch.Tensor):
    torch._check(A.dtype == torch.int8, lambda: f"A must be int8, got {A.dtype}")
    return torch.empty_like(A, dtype=torch.float32, memory_format=torch.contiguous_format)


@_fake("int8_linear_matmul")
def _(A: torch.Tensor, B: torch.Tensor):
    torch._check(A.dtype == torch.int8, lambda: f"A must be int8, got {A.dtype}")
    torch._check(B.dtype == torch.int8, lambda: f"B must be int8, got {B.dtype}")
    torch._check(A.shape[-1] == B.shape[-1], lambda: f"A {tuple(A.shape)} and B {tuple(B.shape)}: K must match")
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@_fake("int8_mm_dequant")
def _(A, row_stats, col_stats, dtype: Optional[torch.dtype] = None, bias=None):
    torch._check(A.dtype == torch.int32, lambda: f"A must be int32, got {A.dtype}")
    return torch.empty_like(A, dtype=dtype or torch.float16, memory_format=torch.contiguous_format)


@_fake("int8_double_quant")
def _(A: torch.Tensor, threshold: float = 0.0):
    out_row = torch.empty_like(A, dtype=torch.int8, memory_format=torch.contiguous_format)
    out_col = torch.empty_like(A, dtype=torch.int8, memory_format=torch.contiguous_format)
    rows = A.numel() // A.shape[-1] if A.shape[-1] else 0
    row_stats = A.new_empty((rows,), dtype=torch.float32)
    col_stats = A.new_empty((A.shape[-1],), dtype=torch.float32)
    if threshold == 0.0:
        return out_row, out_col, row_stats, col_stats, None
    outliers = torch.library.get_ctx().new_dynamic_size()
    return out_row, out_col, row_stats, col_stats, A.new_empty((outliers,), dtype=torch.int64)


@_fake("int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype: Optional[torch.dtype] = None):
    torch._check(A.dtype == torch.int8, lambda: f"A must be int8, got {A.dtype}")
    torch._check(B.dtype == torch.int8, lambda: f"B must be int8, got {B.dtype}")
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16)


@_fake("int8_mixed_linear")
def _(A, CB, SCB, bias=None, threshold: float = 0.0):
    _check_float(A, "A")
    torch._check(CB.dtype == torch.int8, lambda: f"CB must be int8, got {CB.dtype}")
    torch._check(A.shape[-1] == CB.shape[-1], lambda: f"A {tuple(A.shape)} and CB {tuple(CB.shape)}: K must match")
    out = A.new_empty((*A.shape[:-1], CB.shape[0]))
    if threshold == 0.0:
        return out, None
    return out, A.new_empty((A.shape[-1],), dtype=torch.bool)


@_fake("optimizer_update_32bit")
def _(optimizer_name: str, g, p, state1, state2, unorm_vec, *args, **kwargs) -> None:
    torch._check(g.numel() == p.numel(), lambda: f"g has {g.numel()} elements, p has {p.numel()}")
    torch._check(g.dtype == p.dtype, lambda: f"g ({g.dtype}) and p ({p.dtype}) must have the same dtype")


@_fake("optimizer_update_8bit_blockwise")
def _(optimizer_name: str, g, p, state1, state2, *args, **kwargs) -> None:
    torch._check(g.numel() == p.numel(), lambda: f"g has {g.numel()} elements, p has {p.numel()}")
    torch._check(g.dtype == p.dtype, lambda: f"g ({g.dtype}) and p ({p.dtype}) must have the same dtype")
    torch._check(state1.dtype == torch.uint8, lambda: f"state1 must be uint8, got {state1.dtype}")


# op name -> its pure-PyTorch implementation (filled by register_reference).
REFERENCES: dict = {}


def register_reference(name: str):
    """Decorator: register the pure-PyTorch implementation of ``tritonbits::name`` for every device.

    The function is also kept in ``REFERENCES`` so that tests and fallbacks can call it directly,
    whatever kernel the dispatcher would pick.
    """

    def decorate(fn):
        REFERENCES[name] = fn
        torch.library.register_kernel(qualname(name), "default", fn)
        return fn

    return decorate
