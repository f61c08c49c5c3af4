"""QLoRA: fine-tune LoRA adapters on a 4-bit (NF4, double quant) base model with tritonbits + peft.

CPU, nothing downloaded (a small Llama built from a config, random weights, bytes as tokens;
it learns to repeat a short text):
    python examples/qlora_finetune.py

A real model on a GPU (a text file to train on, adapters saved, optionally merged):
    python examples/qlora_finetune.py --model meta-llama/Llama-3.1-8B --device cuda \
        --data my_corpus.txt --steps 200 --batch-size 4 --seq-len 512 --output adapters/ --merge

Prints the loss as it falls, the training throughput (tokens/s) and checks that the 4-bit base
weights did not change.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import tritonbits.hf  # noqa: F401  (registers quant_method "tritonbits" with transformers)
from tritonbits.hf import TritonBitsConfig, dequantize_model
from tritonbits.optim import PagedAdamW8bit

TEXT = (
    "Blockwise quantization stores each block of 64 weights as 4-bit codes and one scale. "
    "LoRA trains two thin matrices beside each frozen layer, so the base model stays small. "
)


def tiny_llama(folder: str, dtype: torch.dtype) -> None:
    """Save a small Llama (hidden 256, 4 layers, 256 byte tokens) with seeded random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=256, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)


def batches(token_ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random windows [batch_size, seq_len] of one long token stream."""
    if token_ids.numel() <= seq_len:
        token_ids = token_ids.repeat(seq_len // token_ids.numel() + 2)
    while True:
        starts = torch.randint(0, token_ids.numel() - seq_len, (batch_size,), generator=generator)
        yield torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model id or folder (default: a tiny random Llama, CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda with --model, else cpu)")
    parser.add_argument("--data", help="a UTF-8 text file to train on (default: a built-in paragraph)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4 with --model, 3e-3 for the tiny model")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="compute dtype and dtype of the unquantized parts "
                        "(default: bfloat16 with --model, float32 for the tiny model: bfloat16 is slow on CPUs)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--paged-adamw-8bit", action="store_true", help="tritonbits' PagedAdamW8bit instead of AdamW")
    parser.add_argument("--output", help="folder to save the adapters to")
    parser.add_argument("--merge", action="store_true", help="also save a dense model with the adapters merged")
    args = parser.parse_args()

    device = args.device or ("cuda" if args.model and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.model else "float32"))
    lr = args.lr or (2e-4 if args.model else 3e-3)
    config = TritonBitsConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    text = open(args.data, encoding="utf-8").read() if args.data else TEXT * 4

    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            path = args.model
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            token_ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        else:
            tiny_llama(scratch, dtype)
            path, token_ids = scratch, torch.tensor(list(text.encode()), dtype=torch.long)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype, device_map=device)

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    # the packed 4-bit codes, to check afterwards that training left them alone
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW8bit(trainable, lr=lr) if args.paged_adamw_8bit else torch.optim.AdamW(trainable, lr=lr)
    data = batches(token_ids, args.batch_size, args.seq_len, torch.Generator().manual_seed(0))
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(data).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += batch.numel()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {tokens / elapsed:.0f} tokens/s over {args.steps} steps")
    if device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    print(f"4-bit base weights unchanged: {unchanged} ({len(frozen)} tensors checked)")
    if not unchanged or not losses[-1] < losses[0]:
        raise SystemExit("QLoRA did not behave: the loss must fall and the 4-bit weights must stay frozen")

    if args.output:
        model.save_pretrained(args.output)  # adapters only
        print(f"adapters saved to {args.output}")
        if args.merge:
            merged = dequantize_model(model, dtype).merge_and_unload()
            merged.save_pretrained(f"{args.output.rstrip('/')}/merged")
            print(f"merged dense model saved to {args.output.rstrip('/')}/merged")


if __name__ == "__main__":
    main()
