"""What a compiled 4-bit layer reads at decode sizes: its weight's scales in two tensors, kept in
the layer's own ``__dict__``.

Under ``torch.compile`` every tensor a forward reaches is a graph input that Dynamo checks on each
call. Tensors found as values of a module's ``__dict__`` (parameters, buffers, plain attributes)
are checked almost for free while that dict is unchanged; tensors reached through the weight's
QuantState are checked one by one (type, shapes, strides, five attribute probes each). A
Llama-3-8B decode step reached 6 tensors and ~75 guards per 4-bit layer that way: 2.5-3.4 ms of
host time per compiled call on an H200 host against 0.72 ms for bf16 (``tests/gpu/
decode_call_cost.py``, 2026-12-04), during which the GPU waited for the CUDA graph's replay.

So a Linear4bit keeps a *decode pack* in ``__dict__["_decode_pack"]``: a tuple of the QuantState's
absmax (the same tensor, not a copy) and one float32 ``meta`` tensor holding the small rest (the
offset, the 4-bit code, the absmax code and scales of double quantization). The integers a launch
needs and the stamp of the QuantState it was built from ride in ``meta``'s strides, on leading
dimensions of size 1: Dynamo's guard on the tensor checks its strides anyway, while every integer
kept elsewhere costs one more guard per layer and call (about 0.1 us each; a layer had 13 of them).
The traced forward checks that the pack still describes the weight by the stamp alone: QuantState
takes a new process-wide number on every assignment to its tensor fields or its ``state2``'s, on
``QuantState.to`` (which reassigns them) and when copied or unpickled, so an equal stamp means the
same state, unchanged. Otherwise it takes the general path. The pack is (re)built in eager code
only: when the weight is quantized, after the layer moves or is copied, and by an eager forward
that finds it stale.

``meta`` is a copy of small tensors; writing into ``quant_state.offset``/``code``/``state2`` in
place (not reassigning them) leaves it stale until :func:`refresh_decode_pack` is called.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant_state import QuantState
from ._compile import mark_static

__all__ = ["compiled_gemv", "keep_decode_pack", "refresh_decode_pack"]

PACK_KEY = "_decode_pack"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


# meta's leading size-1 dimensions carry these integers as strides (its last dimension: stride 1)
_INTS = ("stamp", "out_features", "in_features", "blocksize", "inner_blocksize", "code_size",
         "inner_code_size")  # fmt: skip


def pack_ints(meta: Tensor) -> dict:
    """The integers a pack's ``meta`` carries, by name (``_INTS``)."""
    return dict(zip(_INTS, meta.stride()[: len(_INTS)]))


def _build(quant_state: QuantState) -> Optional[tuple]:
    """The pack ``(absmax, meta)`` of ``quant_state``, or None where the decode op does not apply
    (8-bit or 1-D states, absmax of other dtypes, tensors on several devices, the meta device)."""
    shape = quant_state.shape
    absmax = quant_state.absmax
    if shape is None or len(shape) != 2 or not isinstance(absmax, Tensor) or absmax.device.type == "meta":
        return None
    inner = quant_state.state2
    if inner is not None:
        if absmax.dtype != torch.uint8 or quant_state.offset is None:
            return None
        parts = [quant_state.offset, quant_state.code, inner.code, inner.absmax]
    else:
        if absmax.dtype != torch.float32:
            return None
        parts = [quant_state.code]
    if any(not isinstance(t, Tensor) or t.device != absmax.device for t in parts):
        return None
    flat = torch.cat([t.detach().reshape(-1).float() for t in parts])
    ints = (quant_state._stamp, int(shape[0]), int(shape[1]), quant_state.blocksize,
            0 if inner is None else inner.blocksize, quant_state.code.numel(),
            0 if inner is None else inner.code.numel())  # fmt: skip
    meta = flat.as_strided((1,) * len(ints) + (flat.numel(),), ints + (1,))
    mark_static(meta)
    return absmax, meta


def refresh_decode_pack(module: torch.nn.Module) -> None:
    """(Re)build ``module``'s decode pack from its weight's QuantState if it is missing or stale
    (eager code only; a no-op while tracing)."""
    if torch.compiler.is_compiling():
        return
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    if quant_state is None:
        module.__dict__.pop(PACK_KEY, None)
    else:
        keep_decode_pack(module, quant_state)


def keep_decode_pack(module: torch.nn.Module, quant_state: QuantState) -> None:
    """:func:`refresh_decode_pack` for an eager forward that holds the weight's ``quant_state``:
    one comparison when the pack is current (about 0.35 us on this project's CPU)."""
    if not _current(module.__dict__.get(PACK_KEY), quant_state) and not _capturing(quant_state.absmax):
        module.__dict__[PACK_KEY] = _build(quant_state)


def _capturing(tensor) -> bool:
    # no new tensors inside a CUDA graph capture: the pack would live in the graph's pool
    return isinstance(tensor, Tensor) and tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _current(pack: Optional[tuple], quant_state: QuantState) -> bool:
    # meta's first stride is the stamp (_INTS); the state2's changes restamp its parent too
    return pack is not None and pack[1].stride(0) == quant_state._stamp


def compiled_gemv(module: torch.nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``x @ W.T + bias`` through the fused gemv op with the scales read from ``module``'s decode
    pack, for a traced forward: x [..., K] float with at most ``GEMV_MAX_ROWS`` rows and no
    gradient to compute; [..., N] in x's dtype. None (take the general path) when the pack is
    missing or stale or the call needs anything else."""
    from ..autograd.matmul_4bit import GEMV_MAX_ROWS

    pack = getattr(module, PACK_KEY, None)
    if pack is None or not _current(pack, weight.quant_state):
        return None
    absmax, meta = pack
    ints = pack_ints(meta)  # constants of the trace: meta's strides are guarded with it
    in_features, code_size, inner_code_size = ints["in_features"], ints["code_size"], ints["inner_code_size"]
    if x.dtype not in _FLOAT or x.dim() == 0 or x.shape[-1] != in_features or x.numel() > GEMV_MAX_ROWS * in_features:
        return None
    if x.device != absmax.device or weight.device != x.device:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    shape = [ints["out_features"], in_features]
    packed = weight.reshape(-1)
    meta = meta.reshape(-1)
    if ints["inner_blocksize"]:
        table_end = 1 + code_size + inner_code_size
        out = torch.ops.tritonbits.gemv_4bit_nested(
            x, packed, shape, absmax, meta[1 + code_size : table_end], meta[table_end:], meta[0],
            ints["inner_blocksize"], meta[1 : 1 + code_size], ints["blocksize"],
        )  # fmt: skip
    else:
        out = torch.ops.tritonbits.gemv_4bit(x, packed, shape, absmax, meta, ints["blocksize"])
    return out if bias is None else out + bias.to(out.dtype)
