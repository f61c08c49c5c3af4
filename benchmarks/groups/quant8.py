"""quant8: quantize_blockwise / dequantize_blockwise (8-bit dynamic map), blocksizes 256 and 4096.

Size: 2**28 float32 elements, 1 GiB (2**14 + 37 with --quick: an odd size, partial last block).

Bytes one call must move (n elements, bs blocksize):

- quantize_blockwise: reads 4n, writes n uint8 codes + 4n/bs float32 absmax.
- dequantize_blockwise: reads n + 4n/bs, writes 4n.

Floors (fraction of the measured copy bandwidth tritonbits must reach): quantize 80%,
dequantize 85%. Correctness, once per implementation: rel_err of the round trip against the
input; for tritonbits also ``same_bytes`` (fraction of codes equal to bitsandbytes') and
``bnb_dec_ours`` / ``ours_dec_bnb``: relative difference between one library's decode of the
other's codes and the producer's own decode (0 means identical values).
"""

from __future__ import annotations

import math

import torch

from ..harness import Case, Context, Timed, Unavailable, import_peer, rel_err, resolve, tritonbits_backend
from . import register


def quantize_bytes(n: int, blocksize: int) -> int:
    return 4 * n + n + 4 * math.ceil(n / blocksize)


def dequantize_bytes(n: int, blocksize: int) -> int:
    return n + 4 * math.ceil(n / blocksize) + 4 * n


def _functional(module: str):
    return resolve("tritonbits.functional") if module == "tritonbits" else import_peer("bitsandbytes.functional")


def _cross_checks(F, A, codes, state, blocksize) -> dict:
    try:
        peer = import_peer("bitsandbytes.functional")
    except Unavailable as why:
        return {"cross": f"unavailable: {why}"}
    try:
        return _compare(F, peer, A, codes, state, blocksize)
    except Exception as error:  # a cross-check failure must not hide our own rel_err
        return {"cross": f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def _compare(F, peer, A, codes, state, blocksize) -> dict:
    peer_codes, peer_state = peer.quantize_blockwise(A, blocksize=blocksize)
    own = F.dequantize_blockwise(codes, state)
    theirs = peer.dequantize_blockwise(peer_codes, peer_state)
    return {
        "same_bytes": (codes == peer_codes).float().mean().item(),
        "bnb_dec_ours": rel_err(own, peer.dequantize_blockwise(codes, absmax=state.absmax, blocksize=blocksize)),
        "ours_dec_bnb": rel_err(
            theirs, F.dequantize_blockwise(peer_codes, absmax=peer_state.absmax, blocksize=blocksize)
        ),
    }


def _library_quantize(module, blocksize):
    def make(A) -> Timed:
        F = _functional(module)

        def check():
            codes, state = F.quantize_blockwise(A, blocksize=blocksize)
            metrics = {"rel_err": rel_err(A, F.dequantize_blockwise(codes, state))}
            if module == "tritonbits":
                metrics.update(_cross_checks(F, A, codes, state, blocksize))
            return metrics

        return Timed(
            fn=lambda a: F.quantize_blockwise(a, blocksize=blocksize),
            args=(A,),
            label=f"{module}.functional.quantize_blockwise",
            check=check,
            backend=tritonbits_backend("quantize_blockwise", A.device) if module == "tritonbits" else None,
        )

    return make


def _library_dequantize(module, blocksize):
    def make(A) -> Timed:
        F = _functional(module)
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)

        def check():
            metrics = {"rel_err": rel_err(A, F.dequantize_blockwise(codes, state))}
            if module == "tritonbits":
                metrics.update(_cross_checks(F, A, codes, state, blocksize))
            return metrics

        return Timed(
            fn=F.dequantize_blockwise,
            args=(codes, state),
            label=f"{module}.functional.dequantize_blockwise",
            check=check,
            replicate=lambda: F.quantize_blockwise(A, blocksize=blocksize),
            backend=tritonbits_backend("dequantize_blockwise", A.device) if module == "tritonbits" else None,
        )

    return make


def _torch_ops():
    ops = resolve("tritonbits._ops")
    code = resolve("tritonbits.codebooks").dynamic_map
    return ops.REFERENCES["quantize_blockwise"], ops.REFERENCES["dequantize_blockwise"], code


def _torch_quantize(blocksize):
    def make(A) -> Timed:
        quantize, dequantize, dynamic_map = _torch_ops()
        code = dynamic_map(A.device)

        def check():
            codes, absmax = quantize(A, code, blocksize)
            return {"rel_err": rel_err(A, dequantize(codes, absmax, code, blocksize, A.dtype))}

        return Timed(
            fn=lambda a: quantize(a, code, blocksize),
            args=(A,),
            label="tritonbits PyTorch reference quantize_blockwise",
            check=check,
            backend="torch-ref",
        )

    return make


def _torch_dequantize(blocksize):
    def make(A) -> Timed:
        quantize, dequantize, dynamic_map = _torch_ops()
        code = dynamic_map(A.device)
        codes, absmax = quantize(A, code, blocksize)
        return Timed(
            fn=lambda c, s: dequantize(c, s, code, blocksize, A.dtype),
            args=(codes, absmax),
            label="tritonbits PyTorch reference dequantize_blockwise",
            check=lambda: {"rel_err": rel_err(A, dequantize(codes, absmax, code, blocksize, A.dtype))},
            backend="torch-ref",
        )

    return make


@register("quant8")
def cases(ctx: Context) -> list[Case]:
    n = (1 << 14) + 37 if ctx.quick else 1 << 28
    size = f"{n}" if ctx.quick else "2p28"
    out: list[Case] = []
    for blocksize in (256, 4096):
        info = {"numel": n, "dtype": "float32", "blocksize": blocksize}
        qid = f"quant8.quantize_blockwise.bs{blocksize}.{size}.fp32"
        did = f"quant8.dequantize_blockwise.bs{blocksize}.{size}.fp32"
        for case_id, verb, impls, nbytes, target in (
            (
                qid,
                "quantize_blockwise",
                {
                    "tritonbits": _library_quantize("tritonbits", blocksize),
                    "bitsandbytes": _library_quantize("bitsandbytes", blocksize),
                    "torch": _torch_quantize(blocksize),
                },
                quantize_bytes(n, blocksize),
                0.80,
            ),
            (
                did,
                "dequantize_blockwise",
                {
                    "tritonbits": _library_dequantize("tritonbits", blocksize),
                    "bitsandbytes": _library_dequantize("bitsandbytes", blocksize),
                    "torch": _torch_dequantize(blocksize),
                },
                dequantize_bytes(n, blocksize),
                0.85,
            ),
        ):
            out.append(
                Case(
                    id=case_id,
                    group="quant8",
                    title=f"{verb} fp32 bs{blocksize} {'1GiB' if not ctx.quick else n}",
                    setup=lambda key=case_id: ctx.randn((n,), torch.float32, key),
                    impls=impls,
                    bytes=nbytes,
                    target=target,
                    info=info,
                )
            )
    return out
