"""Kernel launches prepared once per quantized weight and kept on its QuantState.

Eager 4-bit layers call the same kernel on the same weight with the same arguments but for the
activations, thousands of times. Going through the functional API, the op and Triton's launcher
every time costs 50-200 us of host time per call: more than a decode kernel takes on the GPU,
and in QLoRA training, where three such calls run per layer and step, it left the GPU idle. A
:class:`KeptLaunch` does the argument work once; after its first launch it calls the compiled
kernel directly, without Triton's argument binding and cache lookup.

Launches are kept in ``state._kept_launches`` (not copied or pickled with the state, see
``QuantState.__getstate__``; LLM.int8()'s ``MatmulLtState`` holds them the same way) under a key
of the caller's choosing, and rebuilt when the weight's storage or view, or any state tensor
(identity or in-place version), changes.
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional

import torch

from ...quant_state import QuantState
from . import interpreting


class KeptLaunch:
    """A kernel launch whose grid, constexprs and fixed arguments are computed once.

    ``_run(args, spec)`` launches ``kernel`` with the positional ``args`` (every non-constexpr
    parameter, in order). ``spec`` must hold what the compiled kernel was specialized on among
    the arguments that vary between calls (pointer alignment, strides): a call whose ``spec``
    differs from the first one's goes through Triton's full launch.
    """

    def __init__(self, kernel, grid: tuple[int, ...], constexprs: dict, num_warps: int) -> None:
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))  # the compiled kernel's launcher takes three
        self.constexprs = constexprs
        self.constexpr_values = tuple(constexprs.values())  # in the kernel's parameter order
        self.num_warps = num_warps
        self._runner = None  # the compiled kernel's launcher, after the first launch
        self._runner_spec = None

    def _run(self, args: tuple, spec: Hashable = None) -> None:
        if self._runner is not None and spec == self._runner_spec:
            self._runner(*args, *self.constexpr_values)
            return
        compiled = self.kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps)
        if self._runner is None and not interpreting() and hasattr(type(compiled), "__getitem__"):
            self._runner = compiled[self.grid]
            self._runner_spec = spec


def _quant_state_tensors(state: QuantState) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def launch_sources(B: torch.Tensor, tensors: list[torch.Tensor]) -> tuple:
    """What a kept launch was built from: B's storage, view, alignment and version, and the other
    tensors' ids and versions (the entry keeps B and the tensors, so these ids stay theirs).

    B is known by its storage, not its address: FSDP2 frees an unsharded weight's storage after
    forward and allocates it again before backward, so the same weight moves between calls. The
    compiled launch reads the address at every call, and a 16-byte alignment change rebuilds."""
    return (B.untyped_storage()._cdata, B.storage_offset(), B.shape, B.stride(), B.dtype, B.data_ptr() % 16,
            B._version, *(id(t) for t in tensors), *(t._version for t in tensors))  # fmt: skip


def quant_state_sources(B: torch.Tensor, state: QuantState) -> tuple:
    """What :func:`kept_launch` checks a launch kept on ``state`` for the weight B against (by
    default): equal tuples mean the launch still serves B and ``state``."""
    return launch_sources(B, _quant_state_tensors(state))


def kept_launch(holder, key: Hashable, B: torch.Tensor, build: Callable[[], Optional[KeptLaunch]],
                tensors: Optional[list[torch.Tensor]] = None) -> Optional[KeptLaunch]:  # fmt: skip
    """The launch kept on ``holder`` (a QuantState, or any object with a ``__dict__``) under
    ``key`` for the weight B, built by ``build()`` on first use or when B or one of ``tensors``
    (default: the QuantState's tensors) changed; None (also kept) where ``build`` declines."""
    launches = holder.__dict__.setdefault("_kept_launches", {})
    if tensors is None:
        tensors = _quant_state_tensors(holder)
    sources = launch_sources(B, tensors)
    entry = launches.get(key)
    if entry is None or entry[0] != sources:
        entry = (sources, build(), [B, *tensors])
        launches[key] = entry
    return entry[1]
