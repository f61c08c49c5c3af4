"""The functional API, name for name and default for default as ``bitsandbytes.functional`` 0.50.2.

Each function checks its arguments once (clear ``ValueError``/``TypeError`` naming the argument),
then calls ``torch.ops.tritonbits.*``, which dispatches to a Triton kernel or the PyTorch
reference by device. Shapes and formats are documented on each function.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _ops
from .backends import registry as _registry
from .codebooks import (
    cached_table,
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    dynamic_map,
    get_4bit_type,
)
from .quant_state import QuantState
from .utils import pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "get_4bit_type",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
    "is_on_gpu",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_double_quant",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_scaled_mm",
    "int8_mixed_linear",
    "optimizer_update_32bit",
    "optimizer_update_8bit_blockwise",
]

_ops_ns = torch.ops.tritonbits
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _call(name: str, *args, **kwargs):
    """Run op ``name``: through ``torch.ops.tritonbits`` when tracing, under a dispatch mode (fake
    tensors, recorders), or for tensor subclasses and tensors that require grad; else straight to
    the kernel the dispatcher would pick (same result, without the dispatcher's host overhead)."""
    direct = not (torch.compiler.is_compiling() or is_in_torch_dispatch_mode())
    device_type = None
    for arg in args:
        if isinstance(arg, Tensor):
            if type(arg) not in _PLAIN_TENSORS or arg.requires_grad:
                direct = False
                break
            device_type = device_type or arg.device.type
    if direct and device_type is not None:
        return _registry.direct_kernel(name, device_type)(*args, **kwargs)
    return getattr(_ops_ns, name)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# argument checks


def _require_tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(t: Tensor, name: str) -> None:
    _require_tensor(t, name)
    if t.dtype not in _ops.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _require_dtype(t: Tensor, dtypes: tuple[torch.dtype, ...], name: str) -> None:
    _require_tensor(t, name)
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {allowed}, got {t.dtype}")


def _require_same_device(named: dict[str, Optional[Tensor]]) -> None:
    present = {name: t for name, t in named.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _require_blocksize(blocksize, allowed: Optional[tuple[int, ...]] = None) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if allowed is not None and blocksize not in allowed:
        raise ValueError(f"invalid blocksize {blocksize}: must be one of {allowed}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    return blocksize


def _require_quant_type(quant_type) -> str:
    if quant_type not in _ops.QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def _require_out(out: Optional[Tensor], shape, dtype: torch.dtype, device: torch.device, name="out") -> None:
    if out is None:
        return
    _require_tensor(out, name)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, dtype {dtype} and device {device}; "
            f"got shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
        )


def _as_quant_state(state, name: str) -> QuantState:
    """Our QuantState, or one built from a look-alike (bitsandbytes' QuantState) field by field."""
    if isinstance(state, QuantState):
        return state
    fields = ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2")
    if not all(hasattr(state, f) for f in fields):
        raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
    values = {f: getattr(state, f) for f in fields}
    if values["state2"] is not None:
        values["state2"] = _as_quant_state(values["state2"], f"{name}.state2")
    return QuantState(**values)


def is_on_gpu(tensors: Iterable[Optional[Tensor]]) -> bool:
    """True if every tensor given is on one accelerator device; raise if they are spread out.

    CPU tensors are accepted when all are on the CPU (then the result is False). None entries and
    tensors marked ``is_paged`` are skipped, as in bitsandbytes.
    """
    on_gpu = True
    devices = set()
    for t in tensors:
        if t is None or getattr(t, "is_paged", False):
            continue
        on_gpu &= t.device.type != "cpu"
        devices.add(t.device)
    if len(devices) > 1:
        raise RuntimeError(
            f"Input tensors need to be on the same GPU, but found the following tensor and device combinations:\n"
            f"{[(tuple(t.shape), t.device) for t in tensors if t is not None]}"
        )
    return on_gpu and bool(devices)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise


def quantize_blockwise(
    A: Tensor,
    code: Optional[Tensor] = None,
    absmax: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[Tensor, QuantState]:
    """Quantize A to 8-bit codes, one float32 scale (absmax) per block of ``blocksize`` elements.

    Args:
        A: float16/bfloat16/float32, any shape (contiguous or not).
        code: 256-entry float32 codebook; default the signed dynamic map.
        absmax: optional float32 [ceil(n / blocksize)] tensor to receive the scales.
        out: optional uint8 tensor shaped like A to receive the codes.
        blocksize: elements per block, any positive int (GPU kernels are fastest at 64..4096).
        nested: also quantize absmax (blocks of ``blocksize``, around its mean).

    Returns:
        (uint8 codes shaped like A, QuantState with absmax, code, blocksize, dtype).
    """
    _require_float(A, "A")
    blocksize = _require_blocksize(blocksize)
    # The op gets the same code tensor on every call with the same code (the library's cached
    # dynamic map, or the caller's tensor), so that kernels keeping tables per code tensor (the
    # Triton search tables) find them again; the state gets its own copy.
    if code is None:
        code = cached_table("dynamic", A.device)
    else:
        _require_tensor(code, "code")
        if code.numel() != 256:
            raise ValueError(f"code must have 256 entries, got {code.numel()}")
        code = code.to(A.device, torch.float32)
    _require_out(out, A.shape, torch.uint8, A.device)
    codes, scales = _call("quantize_blockwise", A, code, blocksize)
    code = code.clone()

    if nested:
        offset = scales.mean() if scales.numel() else scales.new_zeros(())
        qabsmax, state2 = quantize_blockwise(scales - offset, blocksize=blocksize, nested=False)
        quant_state = QuantState(
            absmax=qabsmax, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
        )
    else:
        quant_state = QuantState(absmax=scales, code=code, blocksize=blocksize, dtype=A.dtype)

    if out is not None:
        codes = out.copy_(codes)
    if absmax is not None:
        _require_out(absmax, quant_state.absmax.shape, quant_state.absmax.dtype, A.device, "absmax")
        quant_state.absmax = absmax.copy_(quant_state.absmax)
    return codes, quant_state


def _decoded_absmax(quant_state: QuantState) -> Tensor:
    """float32 absmax of a state, undoing the 8-bit quantization of nested states."""
    if not quant_state.nested:
        return quant_state.absmax
    absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
    return (absmax + quant_state.offset).float()


def dequantize_blockwise(
    A: Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[Tensor] = None,
    code: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Tensor:
    """Decode 8-bit codes: ``code[A] * absmax[block]`` in the dtype recorded in ``quant_state``.

    Args:
        A: uint8 codes, any shape.
        quant_state: from :func:`quantize_blockwise`; or give ``absmax`` (+ ``code``, ``blocksize``)
            instead, and the result is float32.
        out: optional tensor shaped like A, of the result dtype.
    """
    _require_dtype(A, (torch.uint8,), "A")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise requires either quant_state or absmax")
        if code is None:
            code = dynamic_map(A.device)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    quant_state = _as_quant_state(quant_state, "quant_state")
    _require_blocksize(quant_state.blocksize)
    if quant_state.dtype not in _ops.FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float16, bfloat16 or float32, got {quant_state.dtype}")
    scales = _decoded_absmax(quant_state)
    _require_same_device({"A": A, "quant_state.absmax": scales})
    expected = _ops.num_blocks(A.numel(), quant_state.blocksize)
    if scales.numel() != expected:
        raise ValueError(
            f"absmax has {scales.numel()} entries but A ({A.numel()} elements, blocksize "
            f"{quant_state.blocksize}) needs {expected}"
        )
    _require_out(out, A.shape, quant_state.dtype, A.device)
    result = _call(
        "dequantize_blockwise",
        A, scales.float(), quant_state.code.to(A.device, torch.float32), quant_state.blocksize, quant_state.dtype
    )
    return out.copy_(result) if out is not None else result


# ---------------------------------------------------------------------------------------------
# 4-bit NF4 / FP4


def quantize_4bit(
    A: Tensor,
    absmax: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """Quantize A to packed 4-bit NF4/FP4 codes with one scale per block.

    Args:
        A: float16/bfloat16/float32, any shape.
        blocksize: 32, 64 (default), 128, ..., 4096.
        compress_statistics: store absmax as 8-bit codes (blocks of 256) around its mean.
        quant_type: ``"fp4"`` (default, as in bitsandbytes) or ``"nf4"``.
        quant_storage: dtype of the words holding the packed bytes (uint8, int8, float16,
            bfloat16, float32); A.numel() must be a multiple of 2 * itemsize for wider words.

    Returns:
        (packed [ceil(n / 2) / itemsize, 1] tensor of quant_storage, QuantState). The first
        element of each pair sits in the high nibble of its byte.
    """
    _require_float(A, "A")
    blocksize = _require_blocksize(64 if blocksize is None else blocksize, _ops.BLOCKSIZES_4BIT)
    quant_type = _require_quant_type(quant_type)
    if quant_storage not in _ops.QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {_ops.QUANT_STORAGE_DTYPES}, got {quant_storage}")
    codes_per_word = 2 * quant_storage.itemsize
    if quant_storage.itemsize > 1 and A.numel() % codes_per_word:
        raise ValueError(
            f"A has {A.numel()} elements; quant_storage={quant_storage} packs {codes_per_word} codes per word, "
            f"so the element count must be a multiple of {codes_per_word} (or use quant_storage=torch.uint8)"
        )
    packed, scales = _call("quantize_4bit", A, blocksize, quant_type, quant_storage)
    # A copy per state: layers must not share storage (safetensors refuses shared tensors).
    code = cached_table(quant_type, A.device).clone()

    if compress_statistics:
        offset = scales.mean() if scales.numel() else scales.new_zeros(())
        qabsmax, state2 = quantize_blockwise(scales - offset, blocksize=256)
        state = QuantState(
            absmax=qabsmax,
            shape=A.shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=scales, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )

    if out is not None:
        _require_out(out, packed.shape, packed.dtype, A.device)
        packed = out.copy_(packed)
    if absmax is not None:
        _require_out(absmax, state.absmax.shape, state.absmax.dtype, A.device, "absmax")
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_4bit(
    A: Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> Tensor:
    """Decode packed 4-bit codes to ``quant_state.shape`` in ``quant_state.dtype``.

    Without a quant_state, give ``absmax`` and ``out`` (its shape and dtype say what to produce),
    plus ``blocksize`` (default 64) and ``quant_type``. A packed tensor passed transposed
    ([1, n/2], bitsandbytes' old layout) gives a transposed result, as in bitsandbytes.
    """
    _require_tensor(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit requires both absmax and out when quant_state is not provided")
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=64 if blocksize is None else blocksize,
            quant_type=quant_type,
        )
    quant_state = _as_quant_state(quant_state, "quant_state")
    _require_blocksize(quant_state.blocksize, _ops.BLOCKSIZES_4BIT)
    _require_quant_type(quant_state.quant_type)
    if quant_state.dtype not in _ops.FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float16, bfloat16 or float32, got {quant_state.dtype}")
    if quant_state.shape is None:
        raise ValueError("quant_state.shape is None: a 4-bit state must record the original shape")
    n = prod(quant_state.shape)
    _check_packed_size(A, n, "A")
    _require_same_device({"A": A, "quant_state.absmax": quant_state.absmax})
    expected = _ops.num_blocks(n, quant_state.blocksize)
    if quant_state.absmax.numel() != expected:  # nested: one 8-bit code per block
        raise ValueError(
            f"absmax has {quant_state.absmax.numel()} entries but shape {tuple(quant_state.shape)} with blocksize "
            f"{quant_state.blocksize} needs {expected}"
        )
    launch = _kept_dequantize_launch(A, quant_state)
    if launch is not None:
        result = launch.launch()
    else:
        result = _call(
            "dequantize_4bit",
            A, _decoded_absmax(quant_state).float(), quant_state.blocksize, quant_state.quant_type,
            list(quant_state.shape), quant_state.dtype,
        )  # fmt: skip
    if out is not None:
        _require_out(out, result.shape, result.dtype, A.device)
        result = out.copy_(result)
    if A.dim() == 2 and A.shape[0] == 1 and result.dim() <= 2:
        return result.t()  # bitsandbytes' rule for packed weights passed as [1, n/2]
    return result


def _kept_dequantize_launch(A: Tensor, quant_state: QuantState):
    """The Triton dequantize launch kept on ``quant_state`` (backends/triton/kept_launch.py) for
    eager calls on plain tensors where Triton serves the op, else None (then the op is called).

    Preparing the launch (and, for nested states, decoding the absmax with two more launches)
    costs more host time than the kernel takes on a 8192x8192 weight."""
    module = None if A.requires_grad else _registry.triton_module("dequantize_4bit", A)
    return None if module is None else module.state_dequant_launch(A, quant_state, quant_state.dtype)


def _check_packed_size(A: Tensor, n: int, name: str) -> None:
    """A must hold at least ceil(n / 2) bytes of packed codes."""
    available = A.numel() * A.element_size()
    if available < (n + 1) // 2 - (A.element_size() - 1):
        raise ValueError(f"{name} holds {available} bytes of 4-bit codes, too few for {n} elements")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None) -> Tensor:
    """:func:`dequantize_4bit` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None) -> Tensor:
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def gemv_4bit(
    A: Tensor,
    B: Tensor,
    out: Optional[Tensor] = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: Optional[QuantState] = None,
) -> Tensor:
    """``A @ W.T`` with W [N, K] stored as 4-bit B and its ``state`` (A: [..., K] float; out [..., N]).

    ``transposed_A``/``transposed_B`` are accepted for compatibility and ignored, as in bitsandbytes.
    """
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    state = _as_quant_state(state, "state")
    _require_float(A, "A")
    _require_tensor(B, "B")
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"state.shape must be the 2-D weight shape [N, K], got {state.shape}")
    if A.shape[-1] != state.shape[1]:
        raise ValueError(f"A's last dimension ({A.shape[-1]}) must equal the weight's K ({state.shape[1]})")
    _require_same_device({"A": A, "B": B, "state.absmax": state.absmax})
    code = state.code.to(A.device)
    if state.nested and state.absmax.dtype == torch.uint8:
        # The kernel decodes the 8-bit absmax itself: no float32 absmax is written per call.
        inner = state.state2
        result = _call(
            "gemv_4bit_nested", A, B, list(state.shape), state.absmax, inner.code, inner.absmax,
            state.offset, inner.blocksize, code, state.blocksize
        )  # fmt: skip
    else:
        scales = _decoded_absmax(state)
        result = _call("gemv_4bit", A, B, list(state.shape), scales.float(), code, state.blocksize)
    if out is not None:
        _require_out(out, result.shape, result.dtype, A.device)
        return out.copy_(result)
    return result


# ---------------------------------------------------------------------------------------------
# LLM.int8()


def int8_linear_matmul(A: Tensor, B: Tensor, out: Optional[Tensor] = None, dtype=torch.int32) -> Tensor:
    """Exact ``A @ B.T`` of int8 A [..., K] and int8 B [N, K] as int32 [..., N]."""
    _require_dtype(A, (torch.int8,), "A")
    _require_dtype(B, (torch.int8,), "B")
    if dtype != torch.int32:
        raise ValueError(f"dtype must be torch.int32, got {dtype}")
    if B.dim() != 2 or A.shape[-1] != B.shape[-1]:
        raise ValueError(f"A [..., K] and B [N, K] must share K; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    _require_same_device({"A": A, "B": B, "out": out})
    result = _call("int8_linear_matmul", A, B)
    if out is not None:
        _require_out(out, result.shape, torch.int32, A.device)
        return out.copy_(result)
    return result


def int8_mm_dequant(
    A: Tensor,
    row_stats: Tensor,
    col_stats: Tensor,
    out: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """int32 product [..., N] -> float16 ``A * row_stats * col_stats / 127**2 (+ bias)``."""
    _require_dtype(A, (torch.int32,), "A")
    _require_dtype(row_stats, (torch.float32,), "row_stats")
    _require_dtype(col_stats, (torch.float32,), "col_stats")
    _require_same_device({"A": A, "row_stats": row_stats, "col_stats": col_stats, "bias": bias})
    result = _call("int8_mm_dequant", A, row_stats, col_stats, dtype=torch.float16, bias=bias)
    return out.copy_(result) if out is not None else result


def int8_double_quant(
    A: Tensor,
    col_stats: Optional[Tensor] = None,
    row_stats: Optional[Tensor] = None,
    out_col: Optional[Tensor] = None,
    out_row: Optional[Tensor] = None,
    threshold: float = 0.0,
):
    """Row-wise and column-wise int8 quantization of A [..., K] (LLM.int8() training path).

    Returns (int8 row-quantized, int8 column-quantized, float32 row stats, float32 column stats,
    int64 outlier column indices or None).
    """
    for name, given in (("row_stats", row_stats), ("col_stats", col_stats), ("out_col", out_col), ("out_row", out_row)):
        if given is not None:
            raise ValueError(f"{name} must be None. int8_double_quant() does not support pre-allocated {name}.")
    _require_float(A, "A")
    _require_threshold(threshold)
    return _call("int8_double_quant", A, threshold=float(threshold))


def _require_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")


def int8_vectorwise_dequant(A: Tensor, stats: Tensor) -> Tensor:
    """int8 [..., K] with float32 row stats -> float32 ``A * stats / 127``."""
    _require_dtype(A, (torch.int8,), "A")
    _require_tensor(stats, "stats")
    return _call("int8_vectorwise_dequant", A, stats)


def int8_vectorwise_quant(A: Tensor, threshold: float = 0.0):
    """Row-wise int8 quantization (LLM.int8()): returns (int8 [..., K], float32 row stats, outlier columns).

    With ``threshold > 0``, entries with ``|x| >= threshold`` are excluded from the stats and
    stored as 0, and the int64 indices of the columns holding them are returned (else None).
    """
    _require_float(A, "A")
    _require_threshold(threshold)
    return _call("int8_vectorwise_quant", A, float(threshold))


def int8_scaled_mm(
    A: Tensor,
    B: Tensor,
    row_stats: Tensor,
    col_stats: Tensor,
    bias: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Dequantized int8 product ``(A @ B.T) * row_stats * col_stats / 127**2 + bias`` in ``dtype``."""
    _require_dtype(A, (torch.int8,), "A")
    _require_dtype(B, (torch.int8,), "B")
    _require_same_device({"A": A, "B": B, "row_stats": row_stats, "col_stats": col_stats, "bias": bias})
    return _call("int8_scaled_mm", A, B, row_stats, col_stats, bias=bias, dtype=dtype)


def int8_mixed_linear(
    A: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor] = None, threshold: float = 0.0
) -> tuple[Tensor, Optional[Tensor]]:
    """LLM.int8()'s inference forward in one op (a tritonbits addition; bitsandbytes composes it).

    A [..., K] float is cast to float16, quantized row-wise and multiplied with the int8 weight CB
    [N, K] (float32 row scales SCB [N]); the product is dequantized (+ bias [N]) in A's dtype. With
    ``threshold > 0`` the columns of A holding any ``|x| >= threshold`` are multiplied in A's dtype
    against CB's dequantized columns instead. Returns (output [..., N] in A's dtype, bool [K]
    outlier-column flags, or None without threshold). Up to 16 rows run as three small Triton
    kernels with no host sync.
    """
    _require_float(A, "A")
    _require_dtype(CB, (torch.int8,), "CB")
    _require_threshold(threshold)
    if CB.dim() != 2 or CB.shape[1] != A.shape[-1]:
        raise ValueError(f"CB must be int8 [N, K] with K = A.shape[-1] = {A.shape[-1]}, got shape {tuple(CB.shape)}")
    if SCB.numel() != CB.shape[0]:
        raise ValueError(f"SCB must hold one float32 scale per row of CB ({CB.shape[0]}), got shape {tuple(SCB.shape)}")
    if bias is not None and bias.numel() != CB.shape[0]:
        raise ValueError(f"bias must hold N = {CB.shape[0]} values, got shape {tuple(bias.shape)}")
    _require_same_device({"A": A, "CB": CB, "SCB": SCB, "bias": bias})
    return _call("int8_mixed_linear", A, CB, SCB.reshape(-1).float(), bias, float(threshold))


# ---------------------------------------------------------------------------------------------
# optimizer updates (in place)


def _require_optimizer(name: str, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise ValueError(f"optimizer_name must be one of {allowed}, got {name!r}")


def optimizer_update_32bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    beta1: float,
    eps: float,
    step: int,
    lr: float,
    state2: Optional[Tensor] = None,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    unorm_vec: Optional[Tensor] = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
) -> None:
    """One in-place optimizer step on p with float32 states (bitsandbytes' update rules).

    ``optimizer_name``: adam, lamb, momentum, lars, rmsprop, adagrad, lion, ademamix. g and p
    share a float dtype; state1/state2 are float32 of p's size (ademamix: state1 is [2, *p]).
    """
    _require_optimizer(optimizer_name, _ops.OPTIMIZERS_32BIT)
    _require_float(g, "g")
    _require_float(p, "p")
    param_norm = 0.0
    if max_unorm > 0.0:
        param_norm = torch.norm(p.data.float()).item()
    is_on_gpu([g, p, state1, state2, unorm_vec])
    _call(
        "optimizer_update_32bit",
        optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm,
        beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros,
    )  # fmt: skip


def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
) -> None:
    """One in-place optimizer step with 8-bit states: uint8 codes through qmap, float32 absmax per 256."""
    _require_optimizer(optimizer_name, _ops.OPTIMIZERS_8BIT_BLOCKWISE)
    _require_float(g, "g")
    _require_float(p, "p")
    _require_dtype(state1, (torch.uint8,), "state1")
    is_on_gpu([p, g, state1, state2, qmap1, qmap2, absmax1, absmax2])
    _call(
        "optimizer_update_8bit_blockwise",
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr,
        qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros,
    )  # fmt: skip
