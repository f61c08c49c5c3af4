"""Optimizer base classes: state layout, 8- vs 32-bit choice, paging, overrides, state dicts.

Compatible with ``bitsandbytes.optim.optimizer`` 0.50.2: same class names, constructor
arguments, per-parameter state keys and tensor layouts, so state dicts load across the two.

Per-parameter state (``optimizer.state[p]``):

- ``step`` (int), ``state1`` and, for 2-state rules, ``state2``: float32 shaped like ``p`` when
  the state is 32-bit; uint8 codes when 8-bit, with ``qmap1``/``qmap2`` (256-entry float32 maps:
  signed and unsigned dynamic) and ``absmax1``/``absmax2`` (float32, one per 256 elements).
  AdEMAMix's ``state1`` is ``[2, *p.shape]`` and its 8-bit ``absmax1`` is ``[2, blocks]``.
- ``unorm_vec`` (float32 [1]) when ``max_unorm > 0`` (LAMB, LARS); ``gnorm_vec`` (float32
  [100]) when ``percentile_clipping < 100``.

A parameter gets 8-bit state when ``optim_bits == 8`` and it has at least ``min_8bit_size``
elements (4096 by default); smaller tensors keep 32-bit state. ``state_dict()`` moves the
quantization tensors under the key ``__bnb_optimizer_quant_state__`` so that FSDP's state-dict
gathering skips them, as bitsandbytes does.

Paged optimizers (``is_paged=True``). bitsandbytes allocates paged state in CUDA unified memory
and lets the driver evict it to host memory under pressure. tritonbits does not allocate managed
memory; it keeps the state of each large tensor (>= 100,000 elements) in pinned host memory and
streams it through the GPU during ``step``: the next parameter's state is copied in and the
previous one's copied back out (on two side streams) while one parameter is updated
(``optim/paging.py``). The GPU then holds the states of at most three parameters beyond the
model, however large the optimizer state is, and never asks for memory the GPU does not have. The
cost is PCIe traffic: the state bytes in each direction per step (8-bit Adam: 2 bytes per
parameter each way, 45.8 ms a step for 1.07B parameters on an H200), paid even when the state
would have fit on the GPU. Tensors under 100,000 elements stay on the GPU. ``load_state_dict``
puts the large states back into pinned host memory. On the CPU, paged optimizers behave like the
unpaged ones.

DTensor parameters (FSDP2) are updated through their local shards: state is shaped like
``p.to_local()`` and the update reads ``p.grad.to_local()``. bfloat16/float16 parameters are
updated in float32 and rounded to nearest once per step.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import abc as container_abcs
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Optional

import torch

from .. import functional as F
from ..codebooks import create_dynamic_map
from .paging import PAGED_KEYS, StatePager

__all__ = ["GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State", "MockArgs"]

BLOCKSIZE = 256  # elements per absmax block of 8-bit states
PAGED_MIN_NUMEL = 100_000  # smaller states stay on the GPU even in paged optimizers
NO_8BIT_BLOCKWISE = ("lamb", "lars")  # need a whole-tensor trust ratio: always 32-bit state


class MockArgs:
    """Attribute access to a dict of optimizer arguments (``optim_bits``, ``min_8bit_size``...)."""

    def __init__(self, initial_data):
        for key in initial_data:
            setattr(self, key, initial_data[key])


class GlobalOptimManager:
    """Process-wide per-parameter config overrides (singleton: use ``get_instance()``).

    Call ``register_parameters(model.parameters())`` (while parameters are still the objects the
    optimizer will receive), then ``override_config(param, key, value)`` with any optimizer
    argument (``optim_bits``, ``lr``, ``betas``, ``min_8bit_size``...). Overrides apply when the
    parameter's state is created and at every step.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    def initialize(self):
        self.pid2config = {}
        self.index2config = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple = []

    @classmethod
    def get_instance(cls):
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params):
        groups = list(params)
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gindex, group in enumerate(groups):
            for pindex, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(gindex, pindex)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None):
        """Override optimizer arguments for ``parameters`` (a tensor or a list of tensors).

        Give either ``key`` and ``value`` or ``key_value_dict``.
        """
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None and value is not None:
            if key_value_dict is not None:
                raise ValueError("give either key and value or key_value_dict, not both")
            key_value_dict = {key: value}
        if key_value_dict is None:
            return
        for p in parameters:
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module, param_name, config):
        """Override ``config`` for ``getattr(module, param_name)`` once an optimizer first steps."""
        self.module_weight_config_triple.append((module, param_name, config))


def _paged_buffer(shape, dtype: torch.dtype, device: torch.device,
                  values: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """A pinned host tensor marked as the paged state of a parameter on ``device``: zeros, or a
    copy of ``values``."""
    host = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
    if values is None:
        host.zero_()
    else:
        host.copy_(values)
    host.is_paged = True
    host.page_device = device
    return host


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), else ``t`` itself."""
    if type(t).__name__ == "DTensor":
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.to_local()
    return t


def _states_as_dtensors(p, param_state: dict) -> None:
    """Wrap the per-shard state of DTensor parameter ``p`` as DTensors, in place.

    ``state1``/``state2`` are shaped like ``p``'s local shard (AdEMAMix's ``state1`` has a leading
    2) and become DTensors shaped like ``p``, placed as ``p`` is. ``absmax1``/``absmax2`` hold one
    scale per 256 elements of the local shard, so shards of unequal size have unequal counts;
    each is zero-padded on its last dim to the count of the largest shard and sharded on that dim.
    The padding is dropped again by ``_state_from_dtensor``. Resuming needs the same mesh.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh, placements = p.device_mesh, p.placements
    for key in ("state1", "state2"):
        value = param_state.get(key)
        if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
            continue
        lead = value.dim() - p.dim()
        shape = (*value.shape[:lead], *p.shape)
        value_placements = [Shard(pl.dim + lead) if pl.is_shard() else pl for pl in placements]
        param_state[key] = DTensor.from_local(
            value, mesh, value_placements, run_check=False, shape=shape, stride=_contiguous_strides(shape)
        )
    largest = list(p.shape)  # the first shard is the largest (torch.chunk's rule)
    shards = 1
    for placement, size in zip(placements, mesh.shape):
        if placement.is_shard():
            largest[placement.dim] = -(-largest[placement.dim] // size)
            shards *= size
    blocks = -(-math.prod(largest) // BLOCKSIZE)
    for key in ("absmax1", "absmax2"):
        value = param_state.get(key)
        if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
            continue
        padded = torch.nn.functional.pad(value, (0, blocks - value.shape[-1]))
        shape = (*value.shape[:-1], blocks * shards)
        value_placements = [Shard(value.dim() - 1) if pl.is_shard() else pl for pl in placements]
        param_state[key] = DTensor.from_local(
            padded, mesh, value_placements, run_check=False, shape=shape, stride=_contiguous_strides(shape)
        )


def _state_from_dtensor(p, key: str, value):
    """The local state tensor of ``p`` from a value made by ``_states_as_dtensors`` (else ``value``)."""
    if not isinstance(value, torch.Tensor) or _local(value) is value:
        return value
    local = _local(value)
    if key in ("absmax1", "absmax2"):
        local = local[..., : -(-_local(p).numel() // BLOCKSIZE)]
    return local.contiguous()


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class Optimizer8bit(torch.optim.Optimizer):
    """Base class: state creation, paging, per-parameter config and state dicts."""

    _FSDP_WRAPPED_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"

    def __init__(self, params, defaults, optim_bits=32, is_paged=False):
        super().__init__(params, defaults)
        self.initialized = False
        self.name2qmap = {}
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = {
            "qmap1",
            "qmap2",
            "max1",
            "max2",
            "new_max1",
            "new_max2",
            "state1",
            "state2",
            "gnorm_vec",
            "absmax1",
            "absmax2",
            "unorm_vec",
        }
        if optim_bits == 8:
            self.fill_qmap()

    def fill_qmap(self):
        self.name2qmap["dynamic"] = create_dynamic_map(signed=True)
        self.name2qmap["udynamic"] = create_dynamic_map(signed=False)

    # -- state dicts ------------------------------------------------------------------------

    def state_dict(self):
        """torch's state dict, with the quantization tensors of each parameter moved one level down.

        The state of a DTensor parameter is per shard; it is returned as DTensors on the
        parameter's mesh (see ``_states_as_dtensors``) so that ``torch.distributed.checkpoint``
        saves every rank's shard instead of one rank's copy.
        """
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for index, param_state in state_dict["state"].items():
            if not isinstance(param_state, dict):
                continue
            if isinstance(index, int) and index < len(params) and _local(params[index]) is not params[index]:
                _states_as_dtensors(params[index], param_state)
            wrapped = {k: param_state.pop(k) for k in list(param_state) if k in self.non_castable_tensor_keys}
            if wrapped:
                param_state[self._FSDP_WRAPPED_QUANT_STATE_KEY] = wrapped
        return state_dict

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load a state dict from this class or from bitsandbytes' (same keys and layouts).

        Quantization tensors (codes, maps, absmax, norms) keep their dtype and move to the
        parameter's device (unless ``move_to_device=False``); other floating tensors take the
        parameter's dtype, as in torch.optim.
        """
        state_dict = deepcopy(state_dict)
        for param_state in state_dict["state"].values():
            if isinstance(param_state, dict) and self._FSDP_WRAPPED_QUANT_STATE_KEY in param_state:
                param_state.update(param_state.pop(self._FSDP_WRAPPED_QUANT_STATE_KEY))

        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}"
            )
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        id_map = dict(
            zip(chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups))
        )

        def cast(param, value):
            if isinstance(value, torch.Tensor):
                if param.is_floating_point() and value.dtype != torch.uint8:
                    value = value.to(param.dtype)
                return value
            if isinstance(value, dict):
                for k, v in value.items():
                    if k in self.non_castable_tensor_keys:
                        v = value[k] = _state_from_dtensor(param, k, v)
                        if move_to_device and isinstance(v, torch.Tensor):
                            value[k] = v.to(_local(param).device)
                    else:
                        value[k] = cast(param, v)
                return value
            if isinstance(value, container_abcs.Iterable) and not isinstance(value, str):
                return type(value)(cast(param, v) for v in value)
            return value

        state = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                state[id_map[k]] = cast(id_map[k], v)
            else:
                state[k] = v
        param_groups = []
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            param_groups.append(saved)
        self.__setstate__({"state": state, "param_groups": param_groups})
        if self.is_paged:
            self._page_loaded_states()

    def _page_loaded_states(self):
        """Put the large loaded states of GPU parameters back into pinned host memory, as
        ``get_state_buffer`` made them (a loaded state dict holds plain tensors; bitsandbytes
        leaves them on the GPU, unpaged)."""
        for group in self.param_groups:
            for p in group["params"]:
                local = _local(p)
                if not local.is_cuda or p not in self.state:
                    continue
                for key in PAGED_KEYS:
                    value = self.state[p].get(key)
                    if type(value) is torch.Tensor and value.numel() >= PAGED_MIN_NUMEL:
                        self.state[p][key] = _paged_buffer(value.shape, value.dtype, local.device, value)

    # -- setup ------------------------------------------------------------------------------

    def to_gpu(self):
        """Move non-paged state of accelerator parameters to the parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                local = _local(p)
                if local.device.type == "cpu" or p not in self.state:
                    continue
                for k, v in self.state[p].items():
                    if isinstance(v, torch.Tensor) and not getattr(v, "is_paged", False):
                        self.state[p][k] = v.to(local.device)

    def check_overrides(self):
        for module, attr, config in self.mng.module_weight_config_triple:
            target = getattr(module, attr)
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"{type(module).__name__}.{attr} must be a tensor, got {type(target).__name__}")
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p is target:
                        self.mng.pid2config[id(p)] = config
                        self.mng.index2config[(gindex, pindex)] = config

    def get_config(self, gindex, pindex, group):
        """Arguments for one parameter: its group's values, then GlobalOptimManager overrides."""
        config = {
            "betas": group["betas"],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "lr": group["lr"],
            "alpha": group.get("alpha", 0.0),
            "t_alpha": group.get("t_alpha", None),
            "t_beta3": group.get("t_beta3", None),
            "optim_bits": self.args.optim_bits,
            "min_8bit_size": self.args.min_8bit_size,
            "max_unorm": self.args.max_unorm,
            "skip_zeros": self.args.skip_zeros,
            "percentile_clipping": getattr(self.args, "percentile_clipping", 100),
        }
        config.update(self.mng.index2config.get((gindex, pindex), {}))
        p = self.param_groups[gindex]["params"][pindex]
        config.update(self.mng.pid2config.get(id(p), {}))
        return config

    # -- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        pager = StatePager(self.state) if self.is_paged else None
        for gindex, group in enumerate(self.param_groups):
            batched = []  # updated together by multi-tensor Triton launches (see _update_batched)
            single = []  # updated one by one; paged states stream in and out around their updates
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                (batched if self._batchable(p) else single).append((pindex, p))
            for i, (pindex, p) in enumerate(single):
                if pager is not None and p.is_cuda:
                    pager.fetch(p, ahead=single[i + 1][1] if i + 1 < len(single) else None)
                self.update_step(group, p, gindex, pindex)
                if pager is not None and p.is_cuda:
                    pager.evict(p)
            if batched:
                self._update_batched(group, gindex, batched)
        if pager is not None:
            pager.finish()  # host buffers hold the updated states (state_dict, the next step)
        return loss

    def init_state(self, group, p, gindex, pindex):
        raise NotImplementedError("init_state method needs to be overridden")

    def _batchable(self, p) -> bool:
        """Whether p may be updated by a multi-tensor launch instead of ``update_step``."""
        return False

    def update_step(self, group, p, gindex, pindex):
        raise NotImplementedError("The update_step method needs to be overridden")

    def _state_dtype(self, config, numel):
        """torch.float32 or torch.uint8 for a parameter of ``numel`` elements."""
        if config["optim_bits"] not in (8, 32):
            raise NotImplementedError(f"Amount of optimizer bits not supported: {config['optim_bits']}")
        if config["optim_bits"] == 32 or numel < config["min_8bit_size"]:
            return torch.float32
        if self.optimizer_name in NO_8BIT_BLOCKWISE:
            if not getattr(self, "_warned_no_8bit", False):
                warnings.warn(
                    f"tritonbits: {self.optimizer_name} has no 8-bit blockwise update (its trust ratio needs the "
                    "whole tensor); keeping 32-bit optimizer state.",
                    stacklevel=3,
                )
                self._warned_no_8bit = True
            return torch.float32
        return torch.uint8

    def get_state_buffer(self, p, dtype=torch.float32, shape=None):
        """A zero state tensor for ``p`` (shape ``shape`` or p's local shape); pinned host memory when paged."""
        local = _local(p)
        shape = tuple(local.shape) if shape is None else tuple(shape)
        if local.device.type == "cpu":
            if self.is_paged and not getattr(self, "_cpu_paged_warned", False):
                warnings.warn(
                    "Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.",
                    stacklevel=2,
                )
                self._cpu_paged_warned = True
            return torch.zeros(shape, dtype=dtype, device=local.device)
        if not self.is_paged or local.numel() < PAGED_MIN_NUMEL:
            return torch.zeros(shape, dtype=dtype, device=local.device)
        return _paged_buffer(shape, dtype, local.device)

    def prefetch_state(self, p):
        """bitsandbytes' hint to move ``p``'s paged state towards the GPU ahead of its update. A
        no-op here: ``step`` itself copies each parameter's paged state in while the previous one
        is updated (``optim/paging.py``)."""

    def _gnorm_scale(self, state, grad, config, step):
        """bitsandbytes' percentile clipping: scale down gradients whose norm is above the
        ``percentile_clipping``-th percentile of the last 100 steps' norms. 1.0 when it is 100."""
        percentile = config["percentile_clipping"]
        if percentile >= 100:
            return 1.0
        gnorm_vec = state["gnorm_vec"]
        gnorm_sq = grad.float().pow(2).sum()
        gnorm_vec[step % 100] = gnorm_sq
        clip_value = torch.sqrt(torch.sort(gnorm_vec).values[percentile]).item()
        current = math.sqrt(gnorm_sq.item())
        return clip_value / current if current > clip_value else 1.0

    def _prepare(self, p):
        """(local param, local grad), both contiguous (the fused kernels need flat memory)."""
        local, grad = _local(p), _local(p.grad)
        if not local.is_contiguous():
            if local is not p:
                raise ValueError("DTensor parameters must have contiguous local shards")
            p.data = p.data.contiguous()
            local = p
        if not grad.is_contiguous():
            grad = grad.contiguous()
        return local, grad


def _check_hyperparameters(lr, eps, betas, weight_decay):
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _make_args(args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping, block_wise):
    if not block_wise:
        raise ValueError(
            "block_wise=False (one absmax per tensor) is not supported: 8-bit states are always blockwise"
        )
    if not 1 <= percentile_clipping <= 100:
        raise ValueError(f"percentile_clipping must be an int in [1, 100], got {percentile_clipping!r}")
    if args is not None:
        return args
    return MockArgs(
        {
            "optim_bits": optim_bits,
            "min_8bit_size": min_8bit_size,
            "max_unorm": max_unorm,
            "skip_zeros": skip_zeros,
            "percentile_clipping": percentile_clipping,
        }
    )


class _StatefulOptimizer(Optimizer8bit):
    """Shared init_state/update_step of Optimizer1State and Optimizer2State."""

    num_states = 1

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        config = self.get_config(gindex, pindex, group)
        local = _local(p)
        dtype = self._state_dtype(config, local.numel())
        state = self.state[p]
        state["step"] = 0
        # AdEMAMix keeps two first moments in one [2, *shape] tensor.
        shape1 = (2, *local.shape) if self.optimizer_name == "ademamix" else tuple(local.shape)
        state["state1"] = self.get_state_buffer(p, dtype, shape1)
        if self.num_states == 2:
            state["state2"] = self.get_state_buffer(p, dtype)
        if dtype == torch.uint8:
            if "dynamic" not in self.name2qmap:
                self.fill_qmap()
            blocks = -(local.numel() // -BLOCKSIZE)
            self.name2qmap["dynamic"] = self.name2qmap["dynamic"].to(local.device)
            state["qmap1"] = self.name2qmap["dynamic"]
            absmax1_shape = (2, blocks) if self.optimizer_name == "ademamix" else (blocks,)
            state["absmax1"] = torch.zeros(absmax1_shape, dtype=torch.float32, device=local.device)
            if self.num_states == 2:
                self.name2qmap["udynamic"] = self.name2qmap["udynamic"].to(local.device)
                state["qmap2"] = self.name2qmap["udynamic"]
                state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=local.device)
        if config["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), device=local.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros((100,), device=local.device)

    def _betas_alpha(self, config, step):
        """(beta1, beta2, beta3, alpha) for this step."""
        betas = config["betas"]
        beta2 = betas[1] if len(betas) > 1 else 0.0
        beta3 = betas[2] if len(betas) > 2 else 0.0
        return betas[0], beta2, beta3, config.get("alpha", 0.0) if self.num_states == 2 else 0.0

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        local, grad = self._prepare(p)
        state = self.state[p]
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        step = state["step"]
        beta1, beta2, beta3, alpha = self._betas_alpha(config, step)
        gnorm_scale = self._gnorm_scale(state, grad, config, step) if "gnorm_vec" in state else 1.0
        state2 = state.get("state2")
        if state["state1"].dtype == torch.float32:
            F.optimizer_update_32bit(
                self.optimizer_name, grad, local, state["state1"], beta1, config["eps"], step, config["lr"],
                state2, beta2, beta3, alpha, config["weight_decay"], gnorm_scale,
                state["unorm_vec"] if config["max_unorm"] > 0.0 else None,
                max_unorm=config["max_unorm"], skip_zeros=config["skip_zeros"],
            )  # fmt: skip
        else:
            F.optimizer_update_8bit_blockwise(
                self.optimizer_name, grad, local, state["state1"], state2, beta1, beta2, beta3, alpha,
                config["eps"], step, config["lr"], state["qmap1"], state.get("qmap2"), state["absmax1"],
                state.get("absmax2"), config["weight_decay"], gnorm_scale=gnorm_scale,
                skip_zeros=config["skip_zeros"],
            )  # fmt: skip


    # -- multi-tensor stepping (Triton) --------------------------------------------------------
    # Parameters whose update is the plain rule (no paging, percentile clipping or trust ratio)
    # are grouped by state width, dtype, device and hyperparameters; each group is updated by one
    # launch of the Triton multi-tensor kernels (large tensors still get their own launch there).
    # DTensor parameters (FSDP2) take part through their local shards, as in update_step. Same
    # results as update_step: the same kernels, per parameter.

    def _batchable(self, p) -> bool:
        if type(self).update_step is not _StatefulOptimizer.update_step or self.is_paged:
            return False
        state = self.state[p]
        if "gnorm_vec" in state or "unorm_vec" in state:
            return False
        local, grad = _local(p), _local(p.grad)
        if grad.dtype != local.dtype or not local.is_contiguous() or not grad.is_contiguous() or local.numel() == 0:
            return False
        return _multi_tensor_kernels(local.device) is not None

    @torch.no_grad()
    def _update_batched(self, group, gindex, batched):
        buckets = {}
        for pindex, p in batched:
            config = self.get_config(gindex, pindex, group)
            hyper = (config["eps"], config["lr"], config["weight_decay"])
            if not all(isinstance(x, (int, float)) for x in (*hyper, *config["betas"])):
                self.update_step(group, p, gindex, pindex)  # e.g. a tensor lr: the per-parameter op
                continue
            state = self.state[p]
            state["step"] += 1
            betas = self._betas_alpha(config, state["step"])
            qmaps = (id(state.get("qmap1")), id(state.get("qmap2")))
            key = (state["state1"].dtype, p.dtype, p.device, state["step"], betas, hyper, config["skip_zeros"], qmaps)
            buckets.setdefault(key, []).append(p)
        for (state_dtype, _, device, step, betas, hyper, skip_zeros, _), params in buckets.items():
            kernels = _multi_tensor_kernels(device)
            states = [self.state[p] for p in params]
            eps, lr, weight_decay = hyper
            lists = dict(gs=[_local(p.grad) for p in params], ps=[_local(p) for p in params],
                         state1s=[s["state1"] for s in states], state2s=[s.get("state2") for s in states])  # fmt: skip
            if state_dtype == torch.uint8:
                kernels.multi_tensor_update_8bit_blockwise(
                    self.optimizer_name, **lists, beta1=betas[0], beta2=betas[1], beta3=betas[2], alpha=betas[3],
                    eps=eps, step=step, lr=lr, qmap1=states[0]["qmap1"], qmap2=states[0].get("qmap2"),
                    absmax1s=[s["absmax1"] for s in states], absmax2s=[s.get("absmax2") for s in states],
                    weight_decay=weight_decay, gnorm_scale=1.0, skip_zeros=skip_zeros,
                )  # fmt: skip
            else:
                kernels.multi_tensor_update_32bit(
                    self.optimizer_name, **lists, beta1=betas[0], beta2=betas[1], beta3=betas[2], alpha=betas[3],
                    eps=eps, weight_decay=weight_decay, step=step, lr=lr, gnorm_scale=1.0, skip_zeros=skip_zeros,
                )  # fmt: skip


_KERNELS_BY_DEVICE: dict = {}


def _multi_tensor_kernels(device: torch.device):
    """tritonbits.backends.triton.optim when Triton serves the optimizer ops on ``device``, else None.

    Follows TRITONBITS_BACKEND as the op registry does (auto: CUDA/ROCm only; triton with
    TRITON_INTERPRET=1: CPU too); None when Triton cannot be imported.
    """
    from ..backends.registry import selected_backend, triton_device_types

    key = (device.type, selected_backend())
    if key not in _KERNELS_BY_DEVICE:
        kernels = None
        if device.type in triton_device_types(key[1]):
            try:
                from ..backends.triton import optim as kernels
            except ImportError:
                kernels = None
        _KERNELS_BY_DEVICE[key] = kernels
    return _KERNELS_BY_DEVICE[key]


class Optimizer2State(_StatefulOptimizer):
    """Base of optimizers with two states (Adam, AdamW, LAMB, AdEMAMix).

    Args:
        optimizer_name: update rule: ``"adam"``, ``"lamb"`` or ``"ademamix"``.
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: the rule's hyperparameters (betas may be a string
            ``"(b1, b2)"``; AdEMAMix takes three).
        optim_bits: 32 or 8 (8-bit blockwise state for tensors of >= ``min_8bit_size`` elements).
        args: an object with ``optim_bits``, ``min_8bit_size``, ``max_unorm``, ``skip_zeros``
            attributes, replacing those arguments.
        max_unorm: LAMB's trust-ratio bound (0 disables).
        skip_zeros: leave elements with an exactly-zero gradient untouched.
        is_paged: hold large states in host memory (see the module docstring).
        alpha, t_alpha, t_beta3: AdEMAMix's mixing coefficient and its warm-up lengths.
        percentile_clipping, block_wise: keyword-only, from bitsandbytes < 0.48 (100 and True
            disable; block_wise=False is not supported).
    """

    num_states = 2

    def __init__(
        self,
        optimizer_name,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.0,
        skip_zeros=False,
        is_paged=False,
        alpha=0.0,
        t_alpha: Optional[int] = None,
        t_beta3: Optional[int] = None,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        if isinstance(betas, str):
            betas = [float(b) for b in betas.replace("(", "").replace(")", "").strip().split(",")]
        _check_hyperparameters(lr, eps, betas, weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3
        )
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(
            args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping, block_wise
        )
        self.optimizer_name = optimizer_name

    def _betas_alpha(self, config, step):
        beta1, beta2, beta3, alpha = super()._betas_alpha(config, step)
        # AdEMAMix warm-ups: alpha grows linearly over t_alpha steps; beta3 moves from beta1 to
        # beta3 over t_beta3 steps, linearly in 1 / ln(beta) (Pagliardini et al., 2024).
        if config.get("t_alpha"):
            alpha = min(step * alpha / config["t_alpha"], alpha)
        if config.get("t_beta3"):
            ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
            frac = step / config["t_beta3"]
            beta3 = min(math.exp(ln_beta1 * ln_beta3 / ((1 - frac) * ln_beta3 + frac * ln_beta1)), beta3)
        return beta1, beta2, beta3, alpha


class Optimizer1State(_StatefulOptimizer):
    """Base of optimizers with one state (SGD with momentum, RMSprop, Adagrad, Lion, LARS).

    Arguments as :class:`Optimizer2State` (no alpha/t_alpha/t_beta3); ``betas`` is
    ``(beta1, beta2)`` where the rule uses them (momentum: (momentum, dampening)).
    """

    num_states = 1

    def __init__(
        self,
        optimizer_name,
        params,
        lr=1e-3,
        betas=(0.9, 0.0),
        eps=1e-8,
        weight_decay=0.0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.0,
        skip_zeros=False,
        is_paged=False,
        *,
        percentile_clipping=100,
        block_wise=True,
    ):
        _check_hyperparameters(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(
            args, optim_bits, min_8bit_size, max_unorm, skip_zeros, percentile_clipping, block_wise
        )
        self.optimizer_name = optimizer_name


# ---------------------------------------------------------------------------------------------
# variants: Adam8bit, PagedAdam, ... from one family class


def variant(base, name, *, fixed=None, drop=(), defaults=None, require=None, doc=None):
    """A subclass of ``base`` named ``name`` whose constructor is base's minus some arguments.

    Args:
        fixed: argument values forced on base (e.g. ``{"optim_bits": 8, "is_paged": True}``).
        drop: arguments removed from the signature (their value comes from ``fixed`` or base's
            default).
        defaults: new defaults for arguments that stay.
        require: ``{argument: allowed value}``; another value raises ValueError (bitsandbytes'
            8-bit classes keep ``amsgrad`` and ``optim_bits`` only for signature compatibility).
    """
    fixed, defaults, require = dict(fixed or {}), dict(defaults or {}), dict(require or {})
    signature = inspect.signature(base.__init__)
    parameters = [
        param.replace(default=defaults.get(param.name, param.default))
        for param in signature.parameters.values()
        if param.name not in drop
    ]
    signature = signature.replace(parameters=parameters)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        for key, allowed in require.items():
            if values[key] != allowed:
                raise ValueError(
                    f"{name} does not support {key}={values[key]!r} (only {allowed!r}, kept for compatibility)"
                )
        values.update(fixed)
        base.__init__(self, **values)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{name}.__init__"
    return type(name, (base,), {"__init__": __init__, "__doc__": doc or base.__doc__, "__module__": base.__module__})
