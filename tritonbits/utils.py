"""Helpers of bitsandbytes' public ``utils`` module, name for name.

- state-dict packing: :func:`pack_dict_to_tensor`, :func:`unpack_tensor_to_dict`;
- model surgery: :func:`replace_linear`;
- outlier search for :class:`tritonbits.nn.OutlierAwareLinear`: :func:`find_outlier_dims`,
  :class:`OutlierTracer` and its forward pre-hook :func:`outlier_hook`;
- small odds and ends: :func:`sync_gpu`, :func:`execute_and_return`, the ``weight_format`` codes of
  8-bit checkpoints.

Imported by ``import tritonbits``, so it imports nothing beyond torch and the standard library.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING",
    "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING",
    "OutlierTracer",
    "execute_and_return",
    "find_outlier_dims",
    "logger",
    "outlier_hook",
    "pack_dict_to_tensor",
    "replace_linear",
    "sync_gpu",
    "unpack_tensor_to_dict",
]

logger = logging.getLogger(__name__)

# The ``weight_format`` codes stored in Linear8bitLt checkpoints. tritonbits writes and reads only
# "row"; the other codes named GPU tile layouts that bitsandbytes no longer produces either.
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {code: name for name, code in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}

# Thresholds of the first-layer outlier test in :func:`outlier_hook`: a hidden dimension is an
# outlier if the spread of its activations is 3 standard deviations above the others', or if any
# activation's magnitude exceeds 6 (the LLM.int8() threshold).
_FIRST_LAYER_ZSCORE = 3.0
_FIRST_LAYER_MAGNITUDE = 6.0


def pack_dict_to_tensor(source_dict: dict[str, Any]) -> torch.Tensor:
    """A JSON-serializable dict -> uint8 tensor of its UTF-8 JSON text (for safetensors state dicts)."""
    return torch.tensor(list(json.dumps(source_dict).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor_data: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_dict_to_tensor`."""
    return json.loads(bytes(tensor_data.cpu().to(torch.uint8).tolist()).decode("utf-8"))


def find_outlier_dims(
    weight: torch.Tensor,
    reduction_dim: int = 0,
    zscore: float = 4.0,
    topk: int | None = None,
    rdm: bool = False,
) -> torch.Tensor:
    """Indices of the dimensions of a 2-D ``weight`` whose spread stands out.

    The standard deviation is taken along ``reduction_dim`` (0: one value per column). Returns an
    int64 tensor of indices (any order, possibly empty) on ``weight``'s device:

    - ``topk=None``: the dimensions whose standard deviation lies more than ``zscore`` standard
      deviations above the mean standard deviation;
    - ``topk=k``: the ``k`` dimensions with the largest standard deviation;
    - ``rdm=True``: ``topk`` random column indices (a baseline for experiments; needs ``topk``).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if rdm:
        if topk is None:
            raise ValueError("rdm=True needs topk (how many random dimensions to draw)")
        return torch.randint(0, weight.shape[1], size=(topk,), device=weight.device).long()
    spread = weight.float().std(reduction_dim)
    if topk is not None:
        return torch.topk(spread.abs(), k=topk, dim=0).indices
    standardized = (spread - spread.mean()) / spread.std()
    return torch.where(standardized > zscore)[0]


class OutlierTracer:
    """Process-wide record of the outlier input dimensions of every ``nn.Linear`` of a model.

    Singleton: ``OutlierTracer.get_instance().initialize(model)`` installs :func:`outlier_hook` on
    each ``nn.Linear``; one forward pass then fills the record, keyed by the weight's storage
    address. A layer's outliers are input features: the weight columns whose spread stands out
    (:func:`find_outlier_dims`), except for the first layer run, whose outliers are found from its
    input activations (a spread z-score above 3, or any magnitude above 6).
    :class:`tritonbits.nn.OutlierAwareLinear` reads the record with :meth:`get_outliers`.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("OutlierTracer is a singleton: call OutlierTracer.get_instance()")

    @classmethod
    def get_instance(cls) -> OutlierTracer:
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
        return cls._instance

    def initialize(self, model: torch.nn.Module) -> None:
        """Forget earlier records and hook every ``nn.Linear`` in ``model``."""
        self.last_w = None
        self.current_outlier_dims = None
        self.hvalues: list[int] = []
        self.outliers: list[torch.Tensor] = []
        self.hvalue2outlier_idx: dict[int, torch.Tensor] = {}
        self.initialized = True
        self.hooks = [
            module.register_forward_pre_hook(outlier_hook)
            for module in model.modules()
            if isinstance(module, torch.nn.Linear)
        ]

    def is_initialized(self) -> bool:
        return getattr(self, "initialized", False)

    def get_hvalue(self, weight: torch.Tensor) -> int:
        """The key a weight is recorded under: the address of its storage."""
        return weight.data.untyped_storage().data_ptr()

    def get_outliers(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The recorded outlier indices (int64) for ``weight``, or None if none are recorded."""
        if not self.is_initialized():
            logger.warning("OutlierTracer is not initialized: call OutlierTracer.get_instance().initialize(model)")
            return None
        return self.hvalue2outlier_idx.get(self.get_hvalue(weight))


def outlier_hook(module: torch.nn.Module, input: tuple[torch.Tensor, ...]) -> None:
    """Forward pre-hook installed by :meth:`OutlierTracer.initialize` on each ``nn.Linear``.

    Records the outlier input dimensions of ``module`` the first time it runs; when a layer runs a
    second time (the model's second forward pass) the trace is complete and all hooks are removed.
    """
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"outlier_hook traces torch.nn.Linear modules, got {type(module).__name__}")
    tracer = OutlierTracer.get_instance()
    hvalue = tracer.get_hvalue(module.weight)
    if hvalue in tracer.hvalue2outlier_idx:
        for hook in tracer.hooks:
            hook.remove()
        return
    own = find_outlier_dims(module.weight)
    tracer.outliers.append(own)
    tracer.hvalues.append(hvalue)
    if len(tracer.outliers) > 1:
        # Past the first layer the weight itself tells: columns of unusual spread (input features).
        tracer.hvalue2outlier_idx[hvalue] = own
        return
    # The first layer run is judged by its input activations. As in bitsandbytes the spread test
    # reduces along dim 1 of the (tokens, features) matrix, so its indices are rows; kept for
    # identical results, the magnitude test is the one that finds feature columns.
    activations = input[0].reshape(-1, input[0].shape[-1])
    by_spread = find_outlier_dims(activations, reduction_dim=1, zscore=_FIRST_LAYER_ZSCORE)
    by_magnitude = torch.where((activations.abs() > _FIRST_LAYER_MAGNITUDE).any(dim=0))[0]
    tracer.hvalue2outlier_idx[hvalue] = torch.cat([by_spread, by_magnitude]).unique()


def replace_linear(
    model: torch.nn.Module,
    linear_replacement: Callable[..., torch.nn.Module],
    skip_modules: Iterable[str] = ("lm_head",),
    copy_weights: bool = False,
    post_processing_function: str | None = None,
) -> torch.nn.Module:
    """Replace every ``nn.Linear`` inside ``model`` (recursively, in place) and return ``model``.

    Args:
        model: the module to rewrite.
        linear_replacement: called as ``linear_replacement(in_features, out_features, bias: bool)``
            for each replaced layer (wrap it in a lambda to pass more arguments).
        skip_modules: child names (the last component, e.g. ``"lm_head"``) left untouched.
        copy_weights: reuse the old layer's ``weight`` and ``bias`` Parameters in the new layer.
        post_processing_function: name of a method of the *old* layer; after the replacement it
            is called as ``old.<name>(old)`` (the layer passed again, as bitsandbytes does) if the
            layer has it.
    """
    skip_modules = tuple(skip_modules)
    for name, child in list(model.named_children()):
        if len(list(child.children())) > 0:
            replace_linear(child, linear_replacement, skip_modules, copy_weights, post_processing_function)
        if isinstance(child, torch.nn.Linear) and name not in skip_modules:
            new = linear_replacement(child.in_features, child.out_features, child.bias is not None)
            if copy_weights:
                new.weight = child.weight
                new.bias = child.bias
            model._modules[name] = new
            if post_processing_function is not None:
                hook = getattr(child, post_processing_function, None)
                if hook is not None:
                    hook(child)
    return model


def execute_and_return(command_string: str) -> tuple[str, str]:
    """Run a command (split like a shell, no shell) and return its (stdout, stderr), stripped."""
    result = subprocess.run(shlex.split(command_string), capture_output=True, check=False)
    return result.stdout.decode("utf-8").strip(), result.stderr.decode("utf-8").strip()


def sync_gpu(t: torch.Tensor) -> None:
    """Wait for the device queue of ``t`` (CUDA or XPU) to drain; no-op for other devices."""
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    elif t.device.type == "xpu":
        torch.xpu.synchronize()
