"""Where the time of a QLoRA training step goes: GPU kernels by total time, tritonbits beside bitsandbytes.

``benchmarks/e2e.py`` measured tritonbits' QLoRA step slower than bitsandbytes' on the same model.
This builds the Llama-3-8B-shaped model with fewer layers (``--layers``, default 4), 4-bit with
each library, wraps it with peft LoRA on the seven projections (gradient checkpointing on, as
e2e.py does), times steps and profiles one, printing the GPU kernels by total time and the host
time per step. Run from the repository root: ``python tests/gpu/profile_train.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks import e2e  # noqa: E402


def profile(variant: str, layers: int, batch: int, seq: int) -> None:
    import peft

    device = torch.device("cuda")
    model = e2e.build_model(e2e.llama_config(e2e.LLAMA3_8B, layers), device, seed=0)
    e2e.make_variant(variant, model)
    model.config.use_cache = False
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=e2e.LORA_TARGETS,
                           task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print(f"{variant}: {1e3 * (time.perf_counter() - start) / 5:.1f} ms a step ({layers} layers, {batch}x{seq})")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--variants", default="tritonbits,bitsandbytes")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        profile(variant, args.layers, args.batch, args.seq)
        torch.cuda.empty_cache()  # the model and optimizer went with profile()'s frame


if __name__ == "__main__":
    main()
