"""Ceilings: device copy bandwidth, bf16 matmul rate, int8 matmul rate (see harness for how)."""

from __future__ import annotations

import torch

from ..harness import Case, Context, copy_ceiling_case, matmul_ceiling_case
from . import register


@register("ceilings")
def cases(ctx: Context) -> list[Case]:
    return [copy_ceiling_case(ctx), matmul_ceiling_case(ctx, torch.bfloat16), matmul_ceiling_case(ctx, torch.int8)]
