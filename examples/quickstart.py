"""Quantize real tensors to 4 and 8 bits and back; print the error and the memory saved.

Run: python examples/quickstart.py   (CPU or GPU; uses a GPU when PyTorch sees one)
"""

import torch

import tritonbits as bnb
import tritonbits.functional as F


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def report(name: str, original: torch.Tensor, restored: torch.Tensor, stored_bytes: int) -> None:
    rel = ((restored.float() - original.float()).norm() / original.float().norm()).item()
    print(
        f"{name:<34} rel. error {rel:7.4f}   {nbytes(original) / 2**20:7.2f} MiB -> "
        f"{stored_bytes / 2**20:6.2f} MiB ({nbytes(original) / stored_bytes:4.1f}x smaller)"
    )


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    # A weight matrix the size of one attention projection of a 1B-parameter model.
    weight = (torch.randn(2048, 2048, generator=generator) * 0.02).to(device=device, dtype=torch.bfloat16)
    print(f"tritonbits {bnb.__version__} on {device}: weight {tuple(weight.shape)} {weight.dtype}\n")

    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(weight, quant_type=quant_type, compress_statistics=True)
        restored = F.dequantize_4bit(packed, state)
        stored = nbytes(packed, state.absmax, state.state2.absmax, state.code, state.state2.code)
        report(f"4-bit {quant_type}, double-quantized", weight, restored, stored)

    codes, state = F.quantize_blockwise(weight, blocksize=256)
    report("8-bit dynamic, blocksize 256", weight, F.dequantize_blockwise(codes, state), nbytes(codes, state.absmax))

    activations = torch.randn(16, 2048, generator=generator).to(device=device, dtype=torch.float16)
    q_act, act_stats, _ = F.int8_vectorwise_quant(activations)
    q_w, w_stats, _ = F.int8_vectorwise_quant(weight.half())
    product = F.int8_scaled_mm(q_act, q_w, act_stats, w_stats, dtype=torch.float32)
    exact = activations.float() @ weight.float().t()
    rel = ((product - exact).norm() / exact.norm()).item()
    print(f"{'LLM.int8() matmul 16x2048x2048':<34} rel. error {rel:7.4f}")


if __name__ == "__main__":
    main()
