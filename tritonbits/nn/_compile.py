"""What the layers tell torch.compile about tensors that are not parameters or buffers."""

from __future__ import annotations

from typing import Optional

import torch


def mark_static(*tensors: Optional[torch.Tensor]) -> None:
    """Mark a layer's GPU side tensors (a 4-bit QuantState's, LLM.int8()'s row scales) as static
    addresses for torch.compile, as parameters are (``torch._dynamo.mark_static_address``,
    unguarded: a changed address makes CUDA graphs re-record), so that a CUDA-graphed compiled
    model never copies them into its graph's inputs before a replay, however Dynamo reaches them.
    (Reached through a module's attributes, torch 2.11 already treats them so: a profiled 8B
    decode step showed no such copies.) No effect outside torch.compile; nothing is done while
    tracing, where marking is not allowed."""
    gpu = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda]
    if not gpu or torch.compiler.is_compiling():
        return
    from torch._dynamo import mark_static_address  # imported only once a GPU layer exists

    for t in gpu:
        mark_static_address(t)
