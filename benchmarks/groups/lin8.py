"""lin8: LLM.int8() layers, forward only: tritonbits.nn.Linear8bitLt vs bitsandbytes vs fp16 nn.Linear.

Layer: int8 weights (has_fp16_weights=False), fp16 activations, no bias, outlier threshold 0.0
(pure int8) and 6.0 (mixed-precision decomposition). Shapes K x N in {4096x4096, 8192x28672},
M in {1, 16, 4096} (--quick: 64x96, M in {1, 5}).

Bytes counted are the weight bytes: N*K int8 + 4*N row scales, 2*N*K for fp16. The fraction is of
the copy bandwidth for M <= 64, of the bf16 matmul rate (2*M*N*K) for M = 4096. rel_err: against
x @ W.T in float32 with the fp16 weight (~0.01 for int8).
"""

from __future__ import annotations

import torch

from ..harness import Case, Context, Timed, dense_linear, import_peer, rel_err, resolve
from . import register

SHAPES = ((4096, 4096), (8192, 28672))
BATCHES = (1, 16, 4096)
# Row counts timed also from a CUDA graph (decode sizes, where eager calls measure the host).
GRAPH_ROWS = 16
THRESHOLDS = (0.0, 6.0)


def int8_weight_bytes(K: int, N: int) -> int:
    return N * K + 4 * N


def _layer_8bit(module: str, W: torch.Tensor, threshold: float):
    nn = resolve(f"{module}.nn") if module == "tritonbits" else import_peer(f"{module}.nn")
    N, K = W.shape
    layer = nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight.data = W.cpu()  # quantized to int8 rows by .to(device), as a loaded checkpoint is
    return layer.to(W.device)


def _quantized(module: str, threshold: float):
    def make(inputs) -> Timed:
        W, x, expected = inputs
        layer = _layer_8bit(module, W, threshold)
        return Timed(
            fn=lambda layer, x: layer(x),
            args=(layer, x),
            label=f"{module}.nn.Linear8bitLt threshold={threshold}",
            check=lambda: {"rel_err": rel_err(expected, layer(x))},
            replicate=lambda: (_layer_8bit(module, W, threshold), x),
            bytes=int8_weight_bytes(*W.shape[::-1]),
            # bitsandbytes copies the outlier columns' count to the host; a failed capture would
            # also leave the process unable to capture again.
            not_capturable="host sync for outlier columns" if module == "bitsandbytes" and threshold else None,
        )

    return make


@register("lin8")
def cases(ctx: Context) -> list[Case]:
    shapes, batches = (((64, 96),), (1, 5)) if ctx.quick else (SHAPES, BATCHES)
    out = []
    for K, N in shapes:
        for threshold in THRESHOLDS:
            for M in batches:
                case_id = f"lin8.linear8bitlt.thr{threshold:g}.M{M}.K{K}.N{N}.fp16"

                def setup(K=K, N=N, M=M, key=case_id):
                    W = ctx.randn((N, K), torch.float16, key + ".W") * K**-0.5
                    x = ctx.randn((M, K), torch.float16, key + ".x")
                    return W, x, x.float() @ W.float().T

                out.append(
                    Case(
                        id=case_id,
                        group="lin8",
                        title=f"Linear8bitLt thr{threshold:g} M{M} K{K} N{N}",
                        setup=setup,
                        impls={
                            "tritonbits": _quantized("tritonbits", threshold),
                            "bitsandbytes": _quantized("bitsandbytes", threshold),
                            "torch": dense_linear,
                        },
                        bytes=int8_weight_bytes(K, N),
                        flops=2 * M * N * K,
                        limit="matmul" if M > 64 else "copy",
                        info={"M": M, "K": K, "N": N, "threshold": threshold},
                        graph=M <= GRAPH_ROWS,
                    )
                )
    return out
