"""lin4: 4-bit linear layers, forward only: tritonbits.nn.Linear4bit vs bitsandbytes vs bf16 nn.Linear.

Layer: NF4, blocksize 64, float32 absmax (compress_statistics=False), bf16 compute, no bias.
Shapes K x N (in x out features) in {4096x4096, 4096x14336, 14336x4096, 8192x8192,
8192x28672}, batch rows M in {1, 4, 16, 64, 4096} (--quick: 64x96, M in {1, 5}).

Bytes counted are the weight bytes only, the traffic that bounds small-M decoding: N*K/2 packed
+ 4*N*K/64 absmax for the 4-bit layers, 2*N*K for bf16. The fraction is of the copy bandwidth for
M <= 64 and of the bf16 matmul rate (2*M*N*K flops) for M = 4096, where the layer is compute bound;
the JSON holds both. rel_err: against x @ W.T in float32 with the unquantized weight (the
quantization error, ~0.09 for NF4).
"""

from __future__ import annotations

import torch

from ..harness import Case, Context, Timed, dense_linear, import_peer, rel_err, resolve
from . import register

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))
BATCHES = (1, 4, 16, 64, 4096)
# Row counts timed also from a CUDA graph (decode sizes, where eager calls measure the host).
GRAPH_ROWS = 16
BLOCKSIZE = 64


def nf4_weight_bytes(K: int, N: int, blocksize: int = BLOCKSIZE) -> int:
    return N * K // 2 + 4 * (N * K // blocksize)


def _layer_4bit(module: str, W: torch.Tensor):
    """A Linear4bit of ``module`` holding W [N, K] (quantized when moved to W's device)."""
    nn = resolve(f"{module}.nn") if module == "tritonbits" else import_peer(f"{module}.nn")
    N, K = W.shape
    layer = nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4")
    # Loaded as a user's checkpoint is: full-precision weight on the CPU, quantized by .to(device).
    layer.weight.data = W.cpu()
    return layer.to(W.device)


def _quantized(module: str):
    def make(inputs) -> Timed:
        W, x, expected = inputs
        layer = _layer_4bit(module, W)
        return Timed(
            fn=lambda layer, x: layer(x),
            args=(layer, x),
            label=f"{module}.nn.Linear4bit nf4",
            check=lambda: {"rel_err": rel_err(expected, layer(x))},
            replicate=lambda: (_layer_4bit(module, W), x),
            bytes=nf4_weight_bytes(*W.shape[::-1]),
        )

    return make


@register("lin4")
def cases(ctx: Context) -> list[Case]:
    shapes, batches = (((64, 96),), (1, 5)) if ctx.quick else (SHAPES, BATCHES)
    out = []
    for K, N in shapes:
        for M in batches:
            case_id = f"lin4.linear4bit.nf4.bs{BLOCKSIZE}.M{M}.K{K}.N{N}.bf16"

            def setup(K=K, N=N, M=M, key=case_id):
                W = ctx.randn((N, K), torch.bfloat16, key + ".W") * K**-0.5
                x = ctx.randn((M, K), torch.bfloat16, key + ".x")
                return W, x, x.float() @ W.float().T

            out.append(
                Case(
                    id=case_id,
                    group="lin4",
                    title=f"Linear4bit nf4 M{M} K{K} N{N}",
                    setup=setup,
                    impls={
                        "tritonbits": _quantized("tritonbits"),
                        "bitsandbytes": _quantized("bitsandbytes"),
                        "torch": dense_linear,
                    },
                    bytes=nf4_weight_bytes(K, N),
                    flops=2 * M * N * K,
                    limit="matmul" if M > 64 else "copy",
                    info={"M": M, "K": K, "N": N, "quant_type": "nf4", "blocksize": BLOCKSIZE},
                    graph=M <= GRAPH_ROWS,
                )
            )
    return out
