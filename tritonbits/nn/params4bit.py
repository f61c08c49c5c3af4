"""Params4bit: a frozen weight that holds packed 4-bit NF4/FP4 codes and their QuantState.

Life cycle (as in bitsandbytes 0.50.2): a ``Params4bit`` is built around a dense float weight and
stays dense until it is moved to a device with ``.to(device)``, ``.cuda()`` or ``.cpu()`` (the
CPU counts as a device: ``.cpu()`` quantizes too), or until :meth:`Params4bit.quantize_` is
called. From then on ``data`` is the packed ``[ceil(n / 2) / itemsize, 1]`` tensor of
``quant_storage`` words and ``quant_state`` describes how to decode it.

The state-dict helpers at the bottom are shared by ``Linear4bit`` and ``Embedding4bit``: they
write and read bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__<nf4|fp4>``).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .. import _ops
from .. import functional as F
from ..quant_state import QuantState
from ._compile import mark_static

__all__ = ["Params4bit"]


def _rebuild_params4bit(data: torch.Tensor, requires_grad: bool) -> "Params4bit":
    """Unpickling entry point; the attributes arrive afterwards through ``__setstate__``."""
    return Params4bit(data, requires_grad=requires_grad)


class Params4bit(torch.nn.Parameter):
    """A parameter holding a weight to be (or already) quantized to 4 bits.

    Args:
        data: the dense float weight (or, with ``bnb_quantized=True``, packed codes).
        requires_grad: False by default: 4-bit weights are frozen (QLoRA trains adapters).
        quant_state: the QuantState of already packed ``data``.
        blocksize: elements per absmax block, 64 by default (32 ... 4096).
        compress_statistics: quantize absmax again to 8 bits (blocks of 256), "double quant".
        quant_type: ``"fp4"`` (default) or ``"nf4"``.
        quant_storage: dtype of the words holding the packed bytes (uint8 default; float16,
            bfloat16, float32 for FSDP, which needs one dtype across parameters).
        module: the Linear4bit/Embedding4bit owning this weight; its ``quant_state`` attribute
            is kept in step, so the state survives wrappers that replace the parameter.
        bnb_quantized: whether ``data`` already holds packed codes.
    """

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,
        quant_state: Optional[QuantState] = None,
        blocksize: Optional[int] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: Optional[torch.nn.Module] = None,
        bnb_quantized: bool = False,
        **kwargs,
    ) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        if blocksize is None:
            blocksize = 64
        if blocksize not in _ops.BLOCKSIZES_4BIT:
            raise ValueError(f"blocksize must be one of {_ops.BLOCKSIZES_4BIT}, got {blocksize!r}")
        if quant_type not in _ops.QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if quant_storage not in _ops.QUANT_STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {_ops.QUANT_STORAGE_DTYPES}, got {quant_storage!r}")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        static_under_compile(quant_state)
        return self

    # -- copying and pickling: the packed bytes and the QuantState travel together, exactly

    _ATTRIBUTES = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized")

    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._ATTRIBUTES}
        state["module"] = self.module
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in (*self._ATTRIBUTES, "module"):
            setattr(self, name, state[name])

    def __reduce_ex__(self, protocol):
        # The attributes go in the state part, applied after this object is memoized, so the
        # module <-> parameter reference cycle pickles once.
        return _rebuild_params4bit, (self.data, self.requires_grad), self.__getstate__()

    def __deepcopy__(self, memo) -> "Params4bit":
        if id(self) in memo:
            return memo[id(self)]
        new = _rebuild_params4bit(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = new
        state = self.__getstate__()
        state["quant_state"] = copy.deepcopy(self.quant_state, memo)
        # A copy belongs to the copy of its module; a weight copied alone belongs to none.
        state["module"] = memo.get(id(self.module))
        new.__setstate__(state)
        return new

    def __copy__(self) -> "Params4bit":
        new = _rebuild_params4bit(self.data, self.requires_grad)
        new.__setstate__(self.__getstate__())
        return new

    # -- quant-state fields as properties: FSDP resolves state-dict keys such as "weight.absmax"
    # with getattr, and properties (unlike __getattr__) trace under torch.compile.

    def _state_field(self, name: str, nested: bool = False):
        quant_state = self.__dict__.get("quant_state")
        if quant_state is None or (nested and quant_state.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return quant_state.state2 if nested else quant_state

    absmax = property(lambda self: self._state_field("absmax").absmax)
    code = property(lambda self: self._state_field("code").code)
    quant_map = property(lambda self: self._state_field("quant_map").code)
    offset = property(lambda self: self._state_field("offset").offset)
    state2 = property(lambda self: self._state_field("state2").state2)
    nested_absmax = property(lambda self: self._state_field("nested_absmax", nested=True).absmax)
    nested_blocksize = property(lambda self: self._state_field("nested_blocksize", nested=True).blocksize)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map", nested=True).code)
    nested_dtype = property(lambda self: self._state_field("nested_dtype", nested=True).dtype)
    nested_offset = property(lambda self: self._state_field("nested_offset").offset)

    # -- building and quantizing

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device="cuda",
        module: Optional[torch.nn.Module] = None,
        **kwargs,
    ) -> "Params4bit":
        """A quantized Params4bit from packed ``data`` and its serialized QuantState.

        ``quantized_stats`` holds the quant-state entries of one weight, with or without the
        ``weight.`` prefix: ``absmax``, ``quant_map``, ``quant_state.bitsandbytes__nf4`` ... as
        written by ``state_dict()``. ``quant_storage`` becomes ``data.dtype``.
        """
        quant_state = QuantState.from_dict(qs_dict=quantized_stats, device=device)
        self = cls(
            data.to(device),
            requires_grad=requires_grad,
            quant_state=quant_state,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            quant_type=quant_state.quant_type,
            quant_storage=data.dtype,
            module=module,
            bnb_quantized=True,
        )
        if module is not None:
            module.quant_state = quant_state
        return self

    def _quantize(self, device) -> "Params4bit":
        weight = self.data.contiguous().to(device)
        packed, quant_state = F.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = quant_state
        static_under_compile(quant_state)
        if self.module is not None:
            self.module.quant_state = quant_state
        self.bnb_quantized = True
        return self

    def quantize_(self, device=None) -> "Params4bit":
        """Quantize in place on ``device`` (default: where the weight is); no-op if already quantized.

        The explicit form of what ``.to(device)``/``.cpu()``/``.cuda()`` do on a dense weight.
        """
        if self.bnb_quantized:
            return self
        return self._quantize(self.device if device is None else torch.device(device))

    def cpu(self) -> "Params4bit":
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False) -> "Params4bit":
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def xpu(self, device=None, non_blocking: bool = False) -> "Params4bit":
        return self.to(device="xpu" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs) -> "Params4bit":
        """Move (and on a dense weight: quantize on arrival, as bitsandbytes does).

        A dense weight moved to any real device (not "meta") is quantized there; a ``dtype``
        given with the device is applied to the dense weight first, so it becomes the dtype that
        dequantization restores. Once quantized, ``dtype`` is ignored: the words hold codes, and
        casting them would destroy the bytes. The QuantState moves in place, as in bitsandbytes,
        so a module's parameter and its state stay on one device.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            if dtype is not None:
                self.data = self.data.to(dtype)
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None
        if self.quant_state is not None and device is not None:
            self.quant_state.to(device)
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(
            moved,
            requires_grad=self.requires_grad,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            bnb_quantized=self.bnb_quantized,
        )


# ---------------------------------------------------------------------------------------------
# module helpers shared by Linear4bit and Embedding4bit


def static_under_compile(quant_state: Optional[QuantState]) -> None:
    """Mark a layer weight's GPU quant-state tensors as static addresses for torch.compile
    (:func:`~._compile.mark_static`), like the packed weight, which is a parameter."""
    if quant_state is None:
        return
    tensors = [quant_state.absmax, quant_state.code, quant_state.offset]
    if quant_state.state2 is not None:
        tensors += [quant_state.state2.absmax, quant_state.state2.code]
    mark_static(*tensors)


def quantized_weight(module: torch.nn.Module) -> Params4bit:
    """The module's quantized Params4bit, restoring its QuantState if a wrapper dropped it.

    Wrappers such as FSDP may replace the parameter by a plain tensor holding the same packed
    bytes; the module kept the QuantState (``module.quant_state``), so the weight is rebuilt.
    """
    weight = module.weight
    if isinstance(weight, Params4bit) and weight.quant_state is not None:
        return weight
    quant_state = getattr(module, "quant_state", None)
    if quant_state is None:
        raise RuntimeError(
            f"{type(module).__name__} weight is not quantized yet: move the module to a device "
            "(.to(device), .cuda(), .cpu()) or call .quantize_() first, or load a quantized state dict"
        )
    if not isinstance(weight, Params4bit):
        weight = Params4bit(
            weight.data,
            requires_grad=False,
            quant_storage=weight.dtype,
            quant_type=quant_state.quant_type,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            module=module,
            bnb_quantized=True,
        )
        module.weight = weight
    weight.quant_state = quant_state
    weight.bnb_quantized = True
    return weight


def save_quant_state(module: torch.nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    """Add ``<prefix>weight.<key>`` entries of the weight's packed QuantState (bitsandbytes' keys).

    The module's copy of the state is used when the weight lost its own (FSDP2 replaces it by a
    DTensor of the packed words), so gathered full state dicts stay loadable.
    """
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if quant_state is None:
        return
    entries = quant_state.as_dict(packed=True)
    if not isinstance(weight, Params4bit):
        # torch.distributed.checkpoint resolves each key by getattr from the module down
        # ("weight", then "absmax"); a DTensor weight has no such attributes, so give it them.
        weight.quant_state = quant_state
        for key, value in entries.items():
            if "." not in key:
                setattr(weight, key, value)
    for key, value in entries.items():
        destination[prefix + "weight." + key] = value if keep_vars else value.detach()


def load_prequantized_weight(module: torch.nn.Module, state_dict: dict, prefix: str) -> tuple[dict, bool]:
    """If ``state_dict`` holds a quantized weight for ``module``, install it (a copy).

    This is what lets ``load_state_dict`` of a quantized state dict work on a freshly built
    (dense) module: the packed weight replaces the dense one, on the device the module's weight
    is on (or, for a "meta" module, the device of the loaded tensors).

    Returns (the state dict without the weight's keys, for nn.Module's loader to handle the rest
    such as the bias; whether a quantized weight was installed).
    """
    weight_key = prefix + "weight"
    stat_keys = [key for key in state_dict if key.startswith(weight_key + ".")]
    if weight_key not in state_dict or not stat_keys:
        return state_dict, False
    packed = state_dict[weight_key]
    current = module.weight
    device = packed.device if current.device.type == "meta" else current.device
    # copies, as nn.Module's loader makes: the module must not alias the caller's state dict
    stats = {key[len(weight_key) + 1 :]: state_dict[key] for key in stat_keys}
    stats = {key: value.detach().clone() if isinstance(value, torch.Tensor) else value for key, value in stats.items()}
    skipped = {weight_key, *stat_keys}
    if type(current).__name__ == "DTensor":
        # A sharded weight (FSDP2) belongs to the wrapper: keep the parameter, let nn.Module's
        # loader copy the packed shard into it, and restore the QuantState the module keeps.
        module.quant_state = QuantState.from_dict(qs_dict=stats, device=device)
        if not isinstance(current, Params4bit):
            current.quant_state = module.quant_state
        return {key: value for key, value in state_dict.items() if key not in stat_keys}, False
    module.weight = Params4bit.from_prequantized(
        packed.detach().clone(),
        stats,
        requires_grad=False,
        device=device,
        module=module,
    )
    return {key: value for key, value in state_dict.items() if key not in skipped}, True
