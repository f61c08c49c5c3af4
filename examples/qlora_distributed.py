"""QLoRA on several GPUs (or CPU processes): a frozen 4-bit base, LoRA adapters, an 8-bit optimizer.

The model is a small MLP language model built in code (no download): an embedding, residual
blocks whose two projections are tritonbits ``Linear4bit`` (NF4, double-quantized, packed into
``--quant-storage`` words so FSDP2 shards them like any parameter) each with a hand-written LoRA
adapter, and a 4-bit output head. Only the adapters train. The data is synthetic: every token's
successor is ``(7 * token + 3) mod vocab``, so the loss falls to near 0 when training works.

Launch one process per GPU with torchrun (NCCL on CUDA, gloo on the CPU otherwise)::

    torchrun --nproc_per_node 2 examples/qlora_distributed.py --mode fsdp        # FSDP2 (fully_shard)
    torchrun --nproc_per_node 2 examples/qlora_distributed.py --mode ddp         # DDP
    python examples/qlora_distributed.py                                         # one process

Rank 0 prints the loss (mean over ranks) and the throughput in tokens/s over all ranks.
``--save DIR`` writes a sharded torch.distributed.checkpoint of the model and optimizer to
``DIR/checkpoint`` and the gathered adapters to ``DIR/adapters.pt``. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import tritonbits as bnb


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ A.T @ B.T * alpha / r``: A [r, in] random, B [out, r] zeros (LoRA's init)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


class Block(nn.Module):
    """``x + down(gelu(up(norm(x))))`` with 4-bit ``up`` [dim -> 4 dim] and ``down`` [4 dim -> dim]."""

    def __init__(self, dim: int, quant_storage: torch.dtype, compute_dtype: torch.dtype, r: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        linear = dict(quant_type="nf4", quant_storage=quant_storage, compute_dtype=compute_dtype, bias=False)
        self.up = LoRALinear(bnb.nn.Linear4bit(dim, 4 * dim, **linear), r, 2.0 * r)
        self.down = LoRALinear(bnb.nn.Linear4bit(4 * dim, dim, **linear), r, 2.0 * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TinyQLoRALM(nn.Module):
    """Token ids [batch, seq] (int64) -> logits [batch, seq, vocab] (float32)."""

    def __init__(self, vocab: int, dim: int, layers: int, quant_storage, compute_dtype, r: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, quant_storage, compute_dtype, r) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = bnb.nn.Linear4bit(dim, vocab, bias=False, quant_type="nf4", quant_storage=quant_storage,
                                      compute_dtype=compute_dtype)  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).float()


def build_model(args, device: torch.device) -> TinyQLoRALM:
    """The same frozen base on every rank (a real run loads one pretrained checkpoint everywhere).

    The base must be identical across ranks before wrapping: DDP broadcasts parameters from rank
    0, but the 4-bit QuantState (absmax, code) is neither a parameter nor a buffer.
    """
    torch.manual_seed(args.seed)
    quant_storage = {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}[args.quant_storage]
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TinyQLoRALM(args.vocab, args.dim, args.layers, quant_storage, compute_dtype, args.lora_r)
    model = model.to(device)  # moving quantizes every Linear4bit on that device
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:  # one all-gather per block, freed after use
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embedding, final norm, head
        return model
    return model


def make_batch(args, step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Different sequences on each rank; target[i] = (7 * tokens[i] + 3) mod vocab."""
    generator = torch.Generator().manual_seed(args.seed + 7919 * step + rank)
    tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
    return tokens.to(device), ((7 * tokens + 3) % args.vocab).to(device)


def save(args, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )  # fmt: skip

    # sharded: each rank writes its shards; resume with dcp.load + set_state_dict on the same world size
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(args.save, "checkpoint"))
    # gathered to rank 0: the adapters alone, loadable into an unwrapped model with strict=False
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({k: v for k, v in full.items() if "lora_" in k}, os.path.join(args.save, "adapters.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("fsdp", "ddp", "none"), default="fsdp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--quant-storage", choices=("bf16", "fp32", "uint8"), default="bf16",
                        help="words holding the packed 4-bit codes; FSDP needs a float dtype")  # fmt: skip
    parser.add_argument("--optimizer", default="AdamW8bit", help="any tritonbits.optim class, e.g. Lion8bit")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save", default=None, help="directory for a sharded checkpoint and the adapters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python`: a group of one, so the same code path runs
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.mode == "none" and world_size > 1:
        raise ValueError(f"--mode none with {world_size} ranks would train unsynchronized copies: use ddp or fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    model = wrap(build_model(args, device), args.mode, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(bnb.optim, args.optimizer)(trainable, lr=args.lr)
    if rank == 0:
        print(f"{args.mode} on {world_size} x {device.type} ({dist.get_backend()}): "
              f"{sum(p.numel() for p in trainable):,} trainable parameters (LoRA), {args.optimizer}, "
              f"4-bit base in {args.quant_storage} words", flush=True)  # fmt: skip

    tokens_per_step = args.batch_size * args.seq_len * world_size
    warmup = min(3, args.steps - 1)  # first steps include one-time setup; not timed
    started = None
    for step in range(args.steps):
        if step == warmup:
            if use_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        tokens, targets = make_batch(args, step, rank, device)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss = mean_loss.item() / world_size  # .item() syncs the device, so the timing is honest
            if rank == 0:
                rate = "(warm-up)"
                if started is not None and step >= warmup:
                    elapsed = time.perf_counter() - started
                    rate = f"{(step - warmup + 1) * tokens_per_step / elapsed:,.0f} tokens/s"
                print(f"step {step:5d}  loss {mean_loss:.4f}  {rate}", flush=True)
    if use_cuda and rank == 0:
        print(f"peak GPU memory on rank 0: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    if args.save:
        save(args, model, optimizer)
        if rank == 0:
            print(f"saved {args.save}/checkpoint (sharded) and {args.save}/adapters.pt", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
