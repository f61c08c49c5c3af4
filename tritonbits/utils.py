"""Small helpers shared with bitsandbytes' public ``utils`` module."""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["pack_dict_to_tensor", "unpack_tensor_to_dict"]


def pack_dict_to_tensor(source_dict: dict[str, Any]) -> torch.Tensor:
    """A JSON-serializable dict -> uint8 tensor of its UTF-8 JSON text (for safetensors state dicts)."""
    return torch.tensor(list(json.dumps(source_dict).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor_data: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_dict_to_tensor`."""
    return json.loads(bytes(tensor_data.cpu().to(torch.uint8).tolist()).decode("utf-8"))
