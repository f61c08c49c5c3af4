"""quant4: quantize_4bit / dequantize_4bit, NF4 and FP4, blocksizes 64 and 128, plus nested dequant.

Size: 8192x8192 bfloat16 (40x200 with --quick: 8000 elements, a partial last block at 128).

Bytes one call must move (n elements, bs blocksize, bf16 = 2 bytes):

- quantize_4bit: reads 2n, writes n/2 packed + 4n/bs float32 absmax.
- dequantize_4bit: reads n/2 + 4n/bs, writes 2n.
- dequantize_4bit, nested absmax (compress_statistics=True): reads n/2 + n/bs uint8 absmax
  codes + 4n/(256 bs) float32 second-level absmax, writes 2n.

Floors (fraction of the measured copy bandwidth tritonbits must reach): quantize 80%,
dequantize 85%. Correctness, once per implementation: rel_err of the round trip against the
input; for tritonbits also whether its bytes equal bitsandbytes' and whether each library decodes
the other's output to the same values.
"""

from __future__ import annotations

import math

import torch

from ..harness import Case, Context, Timed, Unavailable, import_peer, rel_err, resolve, tritonbits_backend
from . import register

NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes a 4-bit absmax in 8-bit blocks of 256


def quantize_bytes(n: int, blocksize: int, itemsize: int = 2) -> int:
    return itemsize * n + n // 2 + 4 * math.ceil(n / blocksize)


def dequantize_bytes(n: int, blocksize: int, itemsize: int = 2, nested: bool = False) -> int:
    blocks = math.ceil(n / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) if nested else 4 * blocks
    return n // 2 + absmax + itemsize * n


class _Library:
    """quantize / dequantize of one library behind one interface (tritonbits or bitsandbytes)."""

    def __init__(self, module: str):
        self.name = module
        self.F = resolve(f"{module}.functional") if module == "tritonbits" else import_peer(f"{module}.functional")

    def quantize(self, A, blocksize, quant_type, nested=False):
        return self.F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)

    def dequantize(self, packed, state):
        return self.F.dequantize_4bit(packed, state)

    def decode_raw(self, packed, absmax, blocksize, quant_type, like):
        """Decode bytes produced elsewhere from their float32 absmax (no QuantState crosses over)."""
        state = self.F.QuantState(
            absmax=absmax,
            shape=like.shape,
            dtype=like.dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            code=self.F.get_4bit_type(quant_type, device=like.device),
        )
        return self.F.dequantize_4bit(packed, state)


def _other(library: _Library) -> _Library:
    return _Library("bitsandbytes" if library.name == "tritonbits" else "tritonbits")


def _cross_checks(mine: _Library, A, packed, state, blocksize, quant_type) -> dict:
    """Does the peer produce the same bytes, and decode ours to the same values? (tritonbits only)."""
    try:
        peer = _other(mine)
    except Unavailable as why:
        return {"cross": f"unavailable: {why}"}
    try:
        return _compare(mine, peer, A, packed, state, blocksize, quant_type)
    except Exception as error:  # a cross-check failure must not hide our own rel_err
        return {"cross": f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def _compare(mine: _Library, peer: _Library, A, packed, state, blocksize, quant_type) -> dict:
    metrics: dict = {}
    peer_packed, peer_state = peer.quantize(A, blocksize, quant_type)
    metrics["same_bytes"] = (packed.view(torch.uint8) == peer_packed.view(torch.uint8)).float().mean().item()
    own = mine.dequantize(packed, state)
    metrics["bnb_dec_ours"] = rel_err(own, peer.decode_raw(packed, state.absmax, blocksize, quant_type, A))
    theirs = peer.dequantize(peer_packed, peer_state)
    metrics["ours_dec_bnb"] = rel_err(
        theirs, mine.decode_raw(peer_packed, peer_state.absmax, blocksize, quant_type, A)
    )
    return metrics


def _reference_ops():
    ops = resolve("tritonbits._ops")
    return ops.REFERENCES["quantize_4bit"], ops.REFERENCES["dequantize_4bit"], ops.REFERENCES["dequantize_blockwise"]


def _library_quantize(module, blocksize, quant_type):
    def make(A) -> Timed:
        lib = _Library(module)

        def check():
            packed, state = lib.quantize(A, blocksize, quant_type)
            metrics = {"rel_err": rel_err(A, lib.dequantize(packed, state))}
            if module == "tritonbits":
                metrics.update(_cross_checks(lib, A, packed, state, blocksize, quant_type))
            return metrics

        return Timed(
            fn=lambda a: lib.quantize(a, blocksize, quant_type),
            args=(A,),
            label=f"{module}.functional.quantize_4bit",
            check=check,
            backend=tritonbits_backend("quantize_4bit", A.device) if module == "tritonbits" else None,
        )

    return make


def _library_dequantize(module, blocksize, quant_type, nested):
    def make(A) -> Timed:
        lib = _Library(module)
        packed, state = lib.quantize(A, blocksize, quant_type, nested)

        def replicate():
            return lib.quantize(A, blocksize, quant_type, nested)

        def check():
            metrics = {"rel_err": rel_err(A, lib.dequantize(packed, state))}
            if module == "tritonbits" and not nested:
                metrics.update(_cross_checks(lib, A, packed, state, blocksize, quant_type))
            return metrics

        return Timed(
            fn=lib.dequantize,
            args=(packed, state),
            label=f"{module}.functional.dequantize_4bit",
            check=check,
            replicate=replicate,
            backend=tritonbits_backend("dequantize_4bit", A.device) if module == "tritonbits" else None,
        )

    return make


def _torch_quantize(blocksize, quant_type):
    def make(A) -> Timed:
        quantize, dequantize, _ = _reference_ops()

        def check():
            packed, absmax = quantize(A, blocksize, quant_type, torch.uint8)
            return {"rel_err": rel_err(A, dequantize(packed, absmax, blocksize, quant_type, A.shape, A.dtype))}

        return Timed(
            fn=lambda a: quantize(a, blocksize, quant_type, torch.uint8),
            args=(A,),
            label="tritonbits PyTorch reference quantize_4bit",
            check=check,
            backend="torch-ref",
        )

    return make


def _torch_dequantize(blocksize, quant_type, nested):
    """Our pure-PyTorch reference ops; nested: decode the 8-bit absmax first, as a user's call must."""

    def make(A) -> Timed:
        _, dequantize, dequantize_blockwise = _reference_ops()
        F = resolve("tritonbits.functional")

        def encode():
            return F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)

        packed, state = encode()

        def decode(packed, state):
            absmax = state.absmax
            if nested:
                s2 = state.state2
                absmax = dequantize_blockwise(absmax, s2.absmax, s2.code, s2.blocksize, torch.float32) + state.offset
            return dequantize(packed, absmax, blocksize, quant_type, A.shape, A.dtype)

        return Timed(
            fn=decode,
            args=(packed, state),
            label="tritonbits PyTorch reference dequantize_4bit",
            check=lambda: {"rel_err": rel_err(A, decode(packed, state))},
            replicate=encode,
            backend="torch-ref",
        )

    return make


@register("quant4")
def cases(ctx: Context) -> list[Case]:
    rows, cols = (40, 200) if ctx.quick else (8192, 8192)
    dtype, n = torch.bfloat16, rows * cols
    shape = f"{rows}x{cols}"
    out: list[Case] = []

    def setup(key):
        return lambda: ctx.randn((rows, cols), dtype, key)

    for quant_type in ("nf4", "fp4"):
        for blocksize in (64, 128):
            info = {"shape": [rows, cols], "dtype": "bfloat16", "quant_type": quant_type, "blocksize": blocksize}
            qid = f"quant4.quantize_4bit.{quant_type}.bs{blocksize}.{shape}.bf16"
            out.append(
                Case(
                    id=qid,
                    group="quant4",
                    title=f"quantize_4bit {quant_type} bs{blocksize} {shape} bf16",
                    setup=setup(qid),
                    impls={
                        "tritonbits": _library_quantize("tritonbits", blocksize, quant_type),
                        "bitsandbytes": _library_quantize("bitsandbytes", blocksize, quant_type),
                        "torch": _torch_quantize(blocksize, quant_type),
                    },
                    bytes=quantize_bytes(n, blocksize),
                    target=0.80,
                    info=info,
                )
            )
            did = f"quant4.dequantize_4bit.{quant_type}.bs{blocksize}.{shape}.bf16"
            out.append(
                Case(
                    id=did,
                    group="quant4",
                    title=f"dequantize_4bit {quant_type} bs{blocksize} {shape} bf16",
                    setup=setup(did),
                    impls={
                        "tritonbits": _library_dequantize("tritonbits", blocksize, quant_type, False),
                        "bitsandbytes": _library_dequantize("bitsandbytes", blocksize, quant_type, False),
                        "torch": _torch_dequantize(blocksize, quant_type, False),
                    },
                    bytes=dequantize_bytes(n, blocksize),
                    target=0.85,
                    info=info,
                )
            )

    nid = f"quant4.dequantize_4bit_nested.nf4.bs64.{shape}.bf16"
    out.append(
        Case(
            id=nid,
            group="quant4",
            title=f"dequantize_4bit nf4 bs64 nested {shape} bf16",
            setup=setup(nid),
            impls={
                "tritonbits": _library_dequantize("tritonbits", 64, "nf4", True),
                "bitsandbytes": _library_dequantize("bitsandbytes", 64, "nf4", True),
                "torch": _torch_dequantize(64, "nf4", True),
            },
            bytes=dequantize_bytes(n, 64, nested=True),
            info={"shape": [rows, cols], "dtype": "bfloat16", "quant_type": "nf4", "blocksize": 64, "nested": True},
        )
    )
    return out
