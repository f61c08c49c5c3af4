"""One rank of the distributed tests: ``python ranks.py <ddp|fsdp2> <outdir>``.

Launched twice by ``test_ddp_fsdp2.py`` with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); gloo on the CPU, or NCCL on GPU ``LOCAL_RANK`` when
``TRITONBITS_DIST_DEVICE=cuda``. Models are built and quantized on the CPU, then moved, so the
packed bytes are the same on both devices. Each rank records what it saw in
``<outdir>/<scenario>_rank<RANK>.pt`` (a dict of tensors and numbers) and the parent asserts on
the files: this script checks nothing itself, so a failing rank cannot hide a failure.

The model is a frozen QLoRA base (tritonbits Linear4bit, NF4, double-quantized, packed into
``quant_storage`` words) with trainable low-rank adapters, the setup of QLoRA fine-tuning.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import tritonbits as bnb

# HIDDEN = 65 makes uneven shards on 2 ranks: layer 1's lora_B [65, 8] splits into 33 and 32 rows
# (2 and 1 blocks of 8-bit optimizer state), layer 2's packed weight (65 * 40 / 2 bytes = 650
# bfloat16 words, 325 float32 words) into 325/325 and 163/162 words.
IN_FEATURES, HIDDEN, OUT_FEATURES, RANK_R, BATCH = 64, 65, 40, 8, 6
DEVICE = torch.device("cpu")  # set by main()


class LoRALinear(nn.Module):
    """``base(x) + (x @ A.T @ B.T) * alpha / r`` with A [r, in] and B [out, r] trainable (float32)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, generator=generator) / base.in_features**0.5)
        # B is random too (not zeros, as in LoRA's init) so the adapters change the output from step 0.
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, generator=generator) * 0.05)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def build_model(quant_storage: torch.dtype, seed: int = 0, adapter_seed: int | None = None) -> nn.Sequential:
    """Two LoRA'd Linear4bit layers, quantized on the CPU; the same seeds give the same model.

    ``adapter_seed`` (default: ``seed``) draws the adapters from a generator of their own.
    """
    generator = torch.Generator().manual_seed(seed)
    adapter_generator = torch.Generator().manual_seed(seed if adapter_seed is None else adapter_seed)
    layers = []
    for fan_in, fan_out in ((IN_FEATURES, HIDDEN), (HIDDEN, OUT_FEATURES)):
        base = bnb.nn.Linear4bit(fan_in, fan_out, quant_type="nf4", quant_storage=quant_storage)
        with torch.no_grad():
            base.weight.data = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
            base.bias.copy_(torch.randn(fan_out, generator=generator) * 0.1)
        base = base.cpu()  # quantizes
        base.bias.requires_grad_(False)  # the whole base is frozen, as in QLoRA
        layers.append(LoRALinear(base, RANK_R, 16.0, adapter_generator))
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).to(DEVICE)


_TEACHER = []


@torch.no_grad()
def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on each rank (as a sampler gives), the same for a given (step, rank).

    The target is the output of the same base with other adapters: reachable by training them.
    """
    if not _TEACHER:
        _TEACHER.append(build_model(torch.bfloat16, seed=0, adapter_seed=12345))
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, IN_FEATURES, generator=generator).to(DEVICE)
    return x, _TEACHER[0](x)


def train_steps(model, optimizer, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        x, target = batch(step, rank)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_loss(model, x: torch.Tensor, target: torch.Tensor) -> float:
    return nn.functional.mse_loss(model(x), target).item()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    """Every tensor and step count of the optimizer state, by parameter index and key."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        for key, value in optimizer.state[p].items():
            out[f"{index}.{key}"] = local(value).clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


# -- DDP ------------------------------------------------------------------------------------

DDP_OPTIMIZERS = {
    # name: (constructor, kwargs); min_8bit_size=0 gives every adapter 8-bit state
    "AdamW8bit": (bnb.optim.AdamW8bit, dict(lr=1e-2, min_8bit_size=0)),
    "Adam8bit": (bnb.optim.Adam8bit, dict(lr=1e-2, min_8bit_size=0)),
    "PagedAdamW8bit": (bnb.optim.PagedAdamW8bit, dict(lr=1e-2, min_8bit_size=0)),
    "Lion8bit": (bnb.optim.Lion8bit, dict(lr=1e-3, min_8bit_size=0)),
    "SGD8bit": (bnb.optim.SGD8bit, dict(lr=1e-2, momentum=0.9, min_8bit_size=0)),
    "RMSprop8bit": (bnb.optim.RMSprop8bit, dict(lr=1e-3, min_8bit_size=0)),
    "Adagrad8bit": (bnb.optim.Adagrad8bit, dict(lr=1e-2, min_8bit_size=0)),
    "AdEMAMix8bit": (bnb.optim.AdEMAMix8bit, dict(lr=1e-2, min_8bit_size=0)),
    "LAMB8bit": (bnb.optim.LAMB8bit, dict(lr=1e-2, min_8bit_size=0)),
    "LARS8bit": (bnb.optim.LARS8bit, dict(lr=1e-2, momentum=0.9, min_8bit_size=0)),
    "AdamW": (bnb.optim.AdamW, dict(lr=1e-2)),
    "Lion": (bnb.optim.Lion, dict(lr=1e-3)),
}
DDP_STEPS = 4


def run_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for name, (optimizer_class, kwargs) in DDP_OPTIMIZERS.items():
        # The frozen base is the same on every rank (as when each loads one checkpoint): DDP
        # broadcasts parameters and buffers from rank 0, and the QuantState is neither. The
        # adapters differ per rank; DDP's broadcast must make them equal.
        model = DDP(build_model(torch.bfloat16, seed=0, adapter_seed=100 + rank),
                    device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)  # fmt: skip
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_class(trainable, **kwargs)
        losses = train_steps(model, optimizer, range(DDP_STEPS), rank)
        results[f"{name}/losses"] = torch.tensor(losses)
        for key, value in model.module.state_dict().items():
            results[f"{name}/param/{key}"] = value.clone()
        for key, value in optimizer_state(optimizer).items():
            results[f"{name}/state/{key}"] = value
    return results


# -- FSDP2 ----------------------------------------------------------------------------------

FSDP_STEPS, RESUME_AT = 6, 3


def shard(model: nn.Sequential, mesh) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, LoRALinear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_optimizer(model):
    return bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, min_8bit_size=0)


def run_fsdp2(rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )  # fmt: skip
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
    results = {}
    probe = torch.randn(5, IN_FEATURES, generator=torch.Generator().manual_seed(77)).to(DEVICE)
    for storage in (torch.bfloat16, torch.float32):
        tag = str(storage).removeprefix("torch.")
        reference = build_model(storage)
        model = shard(build_model(storage), mesh)
        results[f"{tag}/param_types"] = [
            (name, type(p).__name__, str(p.dtype), p.requires_grad, tuple(local(p).shape))
            for name, p in model.named_parameters()
        ]
        with torch.no_grad():
            results[f"{tag}/forward_unsharded"] = reference(probe)
            results[f"{tag}/forward_sharded"] = model(probe)

        held_out = batch(step=10_000, rank=0)  # the same on every rank
        results[f"{tag}/eval_loss_before"] = eval_loss(model, *held_out)
        optimizer = make_optimizer(model)
        losses = train_steps(model, optimizer, range(RESUME_AT), rank)
        results[f"{tag}/state_dtypes"] = sorted({str(v.dtype) for s in optimizer.state.values() for k, v in s.items()
                                                 if k in ("state1", "state2")})  # fmt: skip

        checkpoint = os.path.join(sys.argv[2], f"dcp_{tag}")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=checkpoint,
        )
        losses += train_steps(model, optimizer, range(RESUME_AT, FSDP_STEPS), rank)
        results[f"{tag}/losses"] = torch.tensor(losses)
        results[f"{tag}/eval_loss_after"] = eval_loss(model, *held_out)
        results[f"{tag}/final_local"] = {n: local(p).clone() for n, p in model.named_parameters()}

        # resume a fresh sharded model + optimizer (different seed: everything must come from the checkpoint)
        resumed = shard(build_model(storage, seed=5), mesh)
        resumed_optimizer = make_optimizer(resumed)
        state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
        results[f"{tag}/resumed_losses"] = torch.tensor(train_steps(resumed, resumed_optimizer,
                                                                    range(RESUME_AT, FSDP_STEPS), rank))  # fmt: skip
        results[f"{tag}/resumed_final_local"] = {n: local(p).clone() for n, p in resumed.named_parameters()}

        # gather the full state dict (to rank 0, on the CPU) and load it into a plain model
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            trained_out = model(probe)
        if rank == 0:
            plain = build_model(storage, seed=9)
            plain.load_state_dict(full)
            with torch.no_grad():
                results[f"{tag}/full_keys"] = sorted(full)
                results[f"{tag}/forward_trained_sharded"] = trained_out
                results[f"{tag}/forward_trained_reloaded"] = plain(probe)
    return results


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    global DEVICE
    if os.environ.get("TRITONBITS_DIST_DEVICE", "cpu") == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {"ddp": run_ddp, "fsdp2": run_fsdp2}[scenario](rank)
    torch.save(results, os.path.join(outdir, f"{scenario}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
