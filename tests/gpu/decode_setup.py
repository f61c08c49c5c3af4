"""The warmed-up decode that tests/gpu/decode_call_cost.py and profile_decode.py measure: the
Llama-3-8B-shaped model of ``benchmarks/e2e.py`` (random weights; bf16, or 4-bit by tritonbits or
bitsandbytes), with ``generate`` run twice so that the compiled forward and its CUDA graphs exist."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # run from the repository root: benchmarks/ is importable
from benchmarks import e2e  # noqa: E402


def warmed_decode(variant: str, batch: int, new_tokens: int, reuse_cache: bool, layers=None, prompt_len: int = 16):
    """(model, input_ids, generate kwargs, kept cache or None) after two warm-up ``generate`` calls."""
    device = torch.device("cuda")
    model = e2e.build_model(e2e.llama_config(e2e.LLAMA3_8B, layers), device, seed=0)
    if variant == "tritonbits":
        e2e.quantize_tritonbits(model)
    elif variant == "bitsandbytes":
        e2e.quantize_bitsandbytes(model)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    kwargs = e2e.generate_kwargs("reused" if reuse_cache else "static", new_tokens, None)
    cache = e2e.reused_cache(model, prompt_len + new_tokens) if reuse_cache else None
    for _ in range(2):
        seconds, _ = e2e.timed_generate(model, input_ids, kwargs, cache)
        print(f"warm-up generate: {seconds:.2f} s", flush=True)
    return model, input_ids, kwargs, cache
