"""QuantState: everything needed to decode a blockwise-quantized tensor, and its serialized form.

The serialized form is bitsandbytes': ``as_dict(packed=True)`` gives the tensors ``absmax``,
``quant_map`` (and ``nested_absmax``, ``nested_quant_map`` with double quantization) plus one
uint8 tensor ``quant_state.bitsandbytes__<nf4|fp4>`` holding the JSON of the non-tensor fields.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional

import torch

from .utils import pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = ["QuantState"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key}={name!r} is not a torch dtype name")
    return dtype


class QuantState:
    """Container for the quantization statistics of one tensor.

    Attributes:
        absmax: float32 [blocks] scales, or uint8 [blocks] codes when nested (double-quantized).
        shape: the original tensor's shape (4-bit) or None (8-bit blockwise).
        code: the float32 codebook (16 entries for 4-bit, 256 for 8-bit).
        blocksize: elements per block.
        quant_type: ``"nf4"``/``"fp4"`` for 4-bit, None for 8-bit blockwise.
        dtype: the original tensor's dtype, restored by dequantization.
        offset: float32 scalar tensor added back to nested absmax (None if not nested).
        state2: QuantState of the 8-bit quantized absmax (None if not nested).
    """

    # A new process-wide number on every assignment to a tensor field (``to`` reassigns them), of
    # this state or of its ``state2``, and on unpickling or copying, so that what a compiled layer
    # derived from a state can tell, by one integer, that it still describes this very state
    # (nn/compiled_decode.py). ``_parents``: weak references to the states holding this one as
    # their ``state2``.
    _stamp = 0
    _STAMPED = frozenset(("absmax", "code", "offset", "state2"))
    _STAMPS = itertools.count(1)

    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]

    def __init__(
        self,
        absmax,
        shape=None,
        code=None,
        blocksize=None,
        quant_type=None,
        dtype=None,
        offset=None,
        state2=None,
    ):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in QuantState._STAMPED:
            if torch.compiler.is_compiling():
                # a state built inside traced code is a temporary: -1, which no pack ever holds
                object.__setattr__(self, "_stamp", -1)
                return
            if name == "state2" and isinstance(value, QuantState):
                value._adopt(self)
            self._restamp()

    def _restamp(self) -> None:
        object.__setattr__(self, "_stamp", next(QuantState._STAMPS))
        for parent in self.__dict__.get("_parents", ()):
            parent = parent()
            if parent is not None and parent.__dict__.get("state2") is self:
                parent._restamp()

    def _adopt(self, parent: "QuantState") -> None:
        parents = [p for p in self.__dict__.get("_parents", ()) if p() is not None and p() is not parent]
        object.__setattr__(self, "_parents", [*parents, weakref.ref(parent)])

    @property
    def nested(self) -> bool:
        """True when absmax is itself 8-bit quantized (``compress_statistics``/``nested``)."""
        return self.state2 is not None

    def __getattr__(self, name: str):
        # FSDP's state-dict traversal resolves the packed key "quant_state.bitsandbytes__nf4" by getattr.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            if "quant_state." + name in packed:
                return packed["quant_state." + name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getstate__(self) -> dict[str, Any]:
        # Launches prepared for this state's weight (backends/triton/kept_launch.py) and the eager
        # plan that holds one (autograd/matmul_4bit.py: planned_matmul_4bit) are not copied.
        return {k: v for k, v in self.__dict__.items() if k not in ("_kept_launches", "_eager_plan", "_parents")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.__dict__.get("state2"), QuantState):
            self.state2._adopt(self)
        self._restamp()  # a copy is another state

    def __getitem__(self, idx):
        """The pre-0.41 list layout: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> "QuantState":
        """Rebuild a QuantState from ``as_dict()`` output (packed or not), possibly with key prefixes.

        ``qs_dict`` holds only this tensor's quant-state entries, e.g. the ``weight.``-prefixed part
        of a module state dict. It is not modified.
        """
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict:
            if not packed_keys:
                raise ValueError("Expected packed or unpacked quant_state items, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"There should be exactly one `quant_state` item with ending from {cls.valid_qs_type_keys}.\n"
                    f"Detected {packed_keys}."
                )
        if len(packed_keys) == 1:
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(packed_keys[0])))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"Unexpected quant_state keys {sorted(unknown)}; allowed: {cls.valid_qs_keys}")
        missing = {"absmax", "quant_map", "blocksize", "dtype"} - set(qs_dict)
        if missing:
            raise ValueError(f"quant_state is missing {sorted(missing)}")

        offset, state2 = None, None
        if "nested_absmax" in qs_dict:
            offset = torch.tensor(float(qs_dict["nested_offset"]), device=device)
            state2 = cls(
                absmax=qs_dict["nested_absmax"].to(device),
                blocksize=qs_dict["nested_blocksize"],
                code=qs_dict["nested_quant_map"].to(device),
                dtype=_dtype_from_name(qs_dict["nested_dtype"], "nested_dtype"),
            )
        shape = qs_dict.get("shape")
        return cls(
            quant_type=qs_dict.get("quant_type"),
            absmax=qs_dict["absmax"].to(device),
            blocksize=qs_dict["blocksize"],
            code=qs_dict["quant_map"].to(device),
            dtype=_dtype_from_name(qs_dict["dtype"], "dtype"),
            shape=torch.Size(shape) if shape is not None else None,
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict of tensors and plain values; ``packed=True`` gives tensors only."""
        qs_dict = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs_dict.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors refuses tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed or self.quant_type is None:
            return qs_dict
        tensors = {k: v for k, v in qs_dict.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in qs_dict.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = pack_dict_to_tensor(others)
        return tensors

    def to(self, device) -> "QuantState":
        """Move every tensor to ``device`` in place; returns self (bitsandbytes returns None)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return False

        def same_tensor(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), atol=1e-6)

        def same_offset(a, b) -> bool:
            if a is None or b is None:
                return a is b
            return float(a) == float(b)

        return (
            same_tensor(self.absmax, other.absmax)
            and self.shape == other.shape
            and same_tensor(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and same_offset(self.offset, other.offset)
            and (self.state2 == other.state2 if self.nested and other.nested else self.state2 is other.state2)
        )

    __hash__ = None  # mutable container compared by value

    def __repr__(self) -> str:
        kind = self.quant_type or "8-bit blockwise"
        return (
            f"QuantState({kind}, shape={tuple(self.shape) if self.shape is not None else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested}, device={self.device})"
        )
