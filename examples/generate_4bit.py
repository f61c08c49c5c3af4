"""Load a causal LM in 4 bits with tritonbits and generate text; print memory and tokens/s.

CPU, nothing downloaded (a small Llama built from a config, random weights, bytes as tokens):
    python examples/generate_4bit.py

A real model on a GPU:
    python examples/generate_4bit.py --model meta-llama/Llama-3.1-8B --device cuda \
        --compute-dtype bfloat16 --prompt "The capital of France is" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import tritonbits.hf  # noqa: F401  (registers quant_method "tritonbits" with transformers)
from tritonbits.hf import TritonBitsConfig


def tiny_llama(folder: str, dtype: torch.dtype) -> None:
    """Save a small Llama (hidden 256, 4 layers, 256 byte tokens) with seeded random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=256, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)


class ByteTokenizer:
    """Text <-> UTF-8 bytes, the tiny model's "tokenizer"."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        return {"input_ids": torch.tensor([list(text.encode())], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model id or folder (default: a tiny random Llama, CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda with --model, else cpu)")
    parser.add_argument("--prompt", default="Quantization makes large models")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32")
    parser.add_argument("--compute-dtype", default=None, help="float32, bfloat16, float16 (default: the model dtype)")
    parser.add_argument("--dtype", default=None, help="dtype of the unquantized parts "
                        "(default: bfloat16 with --model, float32 for the tiny model: bfloat16 is slow on CPUs)")
    parser.add_argument("--8bit", dest="eight_bit", action="store_true", help="LLM.int8() instead of 4 bits")
    args = parser.parse_args()

    device = args.device or ("cuda" if args.model and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.model else "float32"))
    compute_dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else dtype
    if args.eight_bit:
        config = TritonBitsConfig(load_in_8bit=True)
    else:
        config = TritonBitsConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.quant_type,
            bnb_4bit_use_double_quant=not args.no_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )

    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            path, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
        else:
            tiny_llama(scratch, dtype)
            path, tokenizer = scratch, ByteTokenizer()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype, device_map=device)
        load_s = time.perf_counter() - start

    dense_bytes = sum(p.numel() for p in model.parameters() if p.dtype in (torch.uint8, torch.int8)) * (
        1 if args.eight_bit else 2
    ) * dtype.itemsize + sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
    footprint = model.get_memory_footprint()
    print(f"loaded {args.model or 'tiny random Llama'} on {device} in {load_s:.1f} s")
    print(f"memory footprint {footprint / 2**20:.1f} MiB (the same model in {dtype}: {dense_bytes / 2**20:.1f} MiB)")
    if device.startswith("cuda"):
        print(f"peak GPU memory while loading: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")

    inputs = {k: v.to(device) for k, v in tokenizer(args.prompt, return_tensors="pt").items()}
    prompt_length = inputs["input_ids"].shape[1]
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up (kernels compile)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **generate)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new_tokens = output.shape[1] - prompt_length
    print(f"generated {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s, batch 1, greedy)")
    print("---")
    print(args.prompt + tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
