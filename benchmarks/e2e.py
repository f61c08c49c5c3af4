"""End to end on one GPU: decode and QLoRA-training tokens/s of a Llama-3-8B-shaped model.

    python benchmarks/e2e.py --out out/e2e                 # GPU: writes out/e2e/e2e.json
    python benchmarks/e2e.py --smoke --out /tmp/e2e        # CPU, tiny model, seconds (CI: the code path only)

On an H100 most of the run is torch.compile: two compiles (batch 1, then batch 8 with a dynamic
batch dimension) per decode variant, about a minute each with a cold Inductor cache; training
takes under a minute for both libraries. Every progress line carries the seconds since the start.
Parts can be run apart: ``--only train``, ``--only decode --variants tritonbits,bitsandbytes``.

The model is ``LlamaForCausalLM`` built from a config (hidden 4096, intermediate 14336, 32 layers,
32 heads, 8 KV heads, vocab 128256) with random weights, directly on the device in bfloat16;
nothing is downloaded. Variants, each built from the same seed (one dense model exists at a time):

- ``bf16``: the dense model.
- ``tritonbits``: ``tritonbits.quantize_model`` (NF4, double quant, bfloat16 compute; lm_head
  stays bfloat16, as ``from_pretrained`` with a 4-bit config leaves it).
- ``bitsandbytes``: every ``nn.Linear`` but lm_head replaced by ``bitsandbytes.nn.Linear4bit``
  with the same settings (skipped, saying why, when bitsandbytes is not importable).

**Decode** (what issue #8 compares, and how the reference log was taken): for each batch size, a
random prompt of ``--prompt-len`` tokens, ``model.generate`` greedy with
``cache_implementation="static"`` and ``--new-tokens`` new tokens; with a static cache transformers
compiles the forward itself (``torch.compile(mode="reduce-overhead")``: Inductor + CUDA graphs).
Two warm-up calls of the same shape (they absorb compilation and graph capture), then the median
of ``--repeats`` timed calls. tokens/s = batch * new_tokens / seconds of one whole ``generate``
call (the eager prefill included, as in the reference). Per run the JSON also records the Dynamo
graphs compiled and graph breaks, whether a timed call recompiled, and the CUDA graphs that
cudagraph trees recorded inside each timed call (a recording costs ~0.1 s on an 8B model; with a
new static cache per call they can happen when its tensors land at new addresses, and did for
bf16 and both 4-bit variants in ``benchmarks/results/20261204-h200-session15/``), and the median of
the timed calls that recorded none. ``--gc`` collects garbage before each timed call (untimed; it
did not change the recordings there).
``--reused-cache`` adds mode "reused": the same calls with one ``StaticCache`` per batch size,
passed as ``past_key_values`` and reset before each call, as a server keeping its cache would run
(transformers' own static cache is new in every call, with new tensor addresses; cudagraph trees
re-recorded for them in warm-up calls, none in the timed calls of
``benchmarks/results/20261204-h200-session12/``). Its first call compiles the forward again
(~50 s a variant, 3-4 Dynamo graphs there). The issue's targets are checked in every mode run.
``--eager`` adds
uncompiled runs with the dynamic cache (on an H100 these measure Python overhead, ~6 s a call).

**QLoRA training**: peft LoRA r=16 (alpha 32, no dropout) on q/k/v/o/gate/up/down_proj of the
4-bit model, 32 layers of the 8B shape by default (``--train-layers``), gradient checkpointing
(non-reentrant, as ``prepare_model_for_kbit_training`` enables it), batch 4 x 512 random tokens,
AdamW on the adapters. Unlike ``prepare_model_for_kbit_training`` the unquantized parts (embedding,
norms, lm_head) stay bfloat16 instead of going to float32: bfloat16 compute end to end, the same
for both libraries. peft's own adapters stay float32 (its default). tokens/s over
``--train-steps`` timed steps after ``--train-warmup`` steps.

A failure in one variant (import, quantization, a compile error, a compile longer than
``--compile-timeout`` seconds) is recorded as ``error: ...`` or ``unavailable: ...`` and the others
go on. The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
Exit status 0, or 1 with ``--strict`` when a tritonbits measurement failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import Unavailable, import_peer, tritonbits_backend, version_of  # noqa: E402

SCHEMA = "tritonbits-e2e/1"
VARIANTS = ("bf16", "tritonbits", "bitsandbytes")
# decode modes that compile (see generate_kwargs); "eager" (--eager) does not
COMPILED_MODES = ("static", "reused")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama-3-8B: 8.03e9 parameters, 16.1 GB in bfloat16.
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
SMOKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip

# What issue #8 asks for: (description, numerator variant, denominator variant, rule, ratio).
DECODE_TARGETS = (("4-bit decode >= 2x bitsandbytes", "tritonbits", "bitsandbytes", ">=", 2.0),
                  ("4-bit decode faster than bf16", "tritonbits", "bf16", ">", 1.0))  # fmt: skip
TRAIN_TARGET = ("QLoRA training >= 1.2x bitsandbytes", "tritonbits", "bitsandbytes", ">=", 1.2)

QUANT_SETTINGS = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")


class CompileTimeout(BaseException):
    """A warm-up (where compilation happens) ran past ``--compile-timeout``.

    A BaseException, so that the ``except Exception`` handlers inside Dynamo/Inductor let it
    through instead of quietly falling back to eager execution.
    """


# ---------------------------------------------------------------------------------------------
# model and variants


def llama_config(shape: dict, num_layers: Optional[int] = None):
    from transformers import LlamaConfig

    values = dict(shape)
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    # no end-of-sequence token: every generate call produces exactly the new tokens asked for
    return LlamaConfig(**values, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_model(config, device: torch.device, seed: int):
    """A ``LlamaForCausalLM`` with random weights, allocated and initialized on ``device`` in bf16.

    transformers' own initialization (normal, std ``initializer_range``; norms at one) runs as
    device kernels: on a GPU the 8B model takes about a second, nothing passes through the CPU.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # same weights for every variant
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _quant_state_tensors(weight) -> list[torch.Tensor]:
    state = getattr(weight, "quant_state", None)
    tensors = []
    while state is not None:
        tensors += [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
        state = getattr(state, "state2", None)
    return tensors


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and 4-bit quant states (absmax, codes), each storage once."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for module in model.modules() for t in _quant_state_tensors(getattr(module, "weight", None))]
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def quantize_tritonbits(model: torch.nn.Module) -> str:
    """tritonbits' public path: ``quantize_model`` (lm_head kept dense by default)."""
    import tritonbits

    tritonbits.quantize_model(model, load_in_4bit=True, progress=False, **QUANT_SETTINGS)
    layer = model.model.layers[0].self_attn.q_proj
    return f"{type(layer).__module__}.{type(layer).__name__}"


def quantize_bitsandbytes(model: torch.nn.Module) -> str:
    """Every ``nn.Linear`` but lm_head -> ``bitsandbytes.nn.Linear4bit``, quantized on its device.

    What ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` builds, without
    writing a 16 GB checkpoint to load it from.
    """
    check_available("bitsandbytes")
    bnb = import_peer("bitsandbytes")
    compute_dtype = getattr(torch, QUANT_SETTINGS["bnb_4bit_compute_dtype"])
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear and name != "lm_head"]
    for name in names:  # names, not modules: each dense weight is freed once its layer is replaced
        linear = model.get_submodule(name)
        device = linear.weight.device
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=QUANT_SETTINGS["bnb_4bit_use_double_quant"],
                quant_type=QUANT_SETTINGS["bnb_4bit_quant_type"],
            )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            compress_statistics=QUANT_SETTINGS["bnb_4bit_use_double_quant"],
            quant_type=QUANT_SETTINGS["bnb_4bit_quant_type"],
            module=layer,
        ).to(device)  # a dense Params4bit moved to a device is quantized there
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        del linear
    # what transformers sets on a model loaded in 4 bits; peft reads it to pick its bnb LoRA layers
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    layer = model.model.layers[0].self_attn.q_proj
    return f"{type(layer).__module__}.{type(layer).__name__}"


def check_available(name: str) -> None:
    """Raise :class:`Unavailable` before a model is built for a variant that cannot run here."""
    if name == "bitsandbytes":
        bnb = import_peer("bitsandbytes")
        if "tritonbits" in (getattr(bnb, "__file__", "") or ""):
            raise Unavailable(f"'bitsandbytes' resolves to tritonbits ({bnb.__file__}), not the real package")
    elif name == "tritonbits":
        import_peer("tritonbits")


def make_variant(name: str, model: torch.nn.Module) -> dict:
    """Turn the dense ``model`` into variant ``name`` in place; returns facts about it."""
    start, facts = time.perf_counter(), {}
    if name == "bf16":
        layer = "torch.nn.Linear"
    elif name == "tritonbits":
        layer = quantize_tritonbits(model)
        facts["tritonbits_ops"] = tritonbits_ops(_device_of(model))
    elif name == "bitsandbytes":
        layer = quantize_bitsandbytes(model)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    _synchronize(model)
    return {"linear": layer, "quantize_s": time.perf_counter() - start, "weights_GB": weight_bytes(model) / 1e9,
            **facts}  # fmt: skip


def tritonbits_ops(device: torch.device) -> dict:
    """What serves each 4-bit op tritonbits' layers call here: "triton" or "torch-ref"."""
    from tritonbits.backends.registry import TRITON_KERNELS

    ops = ("gemv_4bit", "gemv_4bit_nested", "dequantize_4bit", "dequantize_blockwise")
    return {op: tritonbits_backend(op, device) for op in ops if op in TRITON_KERNELS}


# ---------------------------------------------------------------------------------------------
# helpers


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _synchronize(model_or_device) -> None:
    device = model_or_device if isinstance(model_or_device, torch.device) else _device_of(model_or_device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_compiler() -> None:
    # A new model is a new set of guards on the same code objects: without a reset, variants and
    # batch sizes pile up toward Dynamo's recompile limit (after which it silently runs eagerly).
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()


def _compile_stats() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "break_reasons": sorted(counters["graph_break"])[:5],
    }


@contextlib.contextmanager
def _counting_recordings(counts: list):
    """Append to ``counts`` the CUDA graphs cudagraph trees records inside the block (by
    wrapping ``CUDAGraphTreeManager.record_function``; nothing is counted where it is absent)."""
    try:
        from torch._inductor import cudagraph_trees
    except ImportError:
        cudagraph_trees = None
    manager = getattr(cudagraph_trees, "CUDAGraphTreeManager", None)
    original = getattr(manager, "record_function", None)
    if original is None:
        yield
        return

    def record_function(*args, **kwargs):
        counts.append(1)
        return original(*args, **kwargs)

    manager.record_function = record_function
    try:
        yield
    finally:
        manager.record_function = original


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_GB(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raise :class:`CompileTimeout` in this thread after ``seconds`` (POSIX main thread only)."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"warm-up (compilation) ran past --compile-timeout={seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, math.ceil(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# decode


def generate_kwargs(mode: str, new_tokens: int, compile_config) -> dict:
    """``generate`` arguments: greedy, exactly ``new_tokens``; "static" = a new static cache in each
    call, compiled; "reused" = compiled too, the caller passes one kept cache (``reused_cache``)."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
    if mode in COMPILED_MODES:
        if mode == "static":
            kwargs["cache_implementation"] = "static"
        if compile_config is not None:
            kwargs["compile_config"] = compile_config
    else:
        kwargs["disable_compile"] = True
    return kwargs


def reused_cache(model, max_len: int):
    """A ``StaticCache`` for ``max_len`` tokens, to be passed to every ``generate`` call of one
    batch size (reset before each, see ``timed_generate``). Its tensors keep their addresses from
    call to call; with ``cache_implementation="static"`` transformers builds a new cache per call."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)  # device and dtype: from the first update


def timed_generate(model, input_ids: torch.Tensor, kwargs: dict, cache=None) -> tuple[float, torch.Tensor]:
    """Seconds of one ``generate`` call (device synchronized on both sides) and its output; with
    ``cache``, a kept cache, reset first (outside the timing) and passed as ``past_key_values``."""
    if cache is not None:
        cache.reset()
        kwargs = dict(kwargs, past_key_values=cache)
    _synchronize(input_ids.device)
    start = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    _synchronize(input_ids.device)
    return time.perf_counter() - start, output


def decode_run(model, mode: str, batch: int, args, compile_config) -> dict:
    """Warm up, then time ``generate`` at one batch size; the record of one table row."""
    device = _device_of(model)
    generator = torch.Generator().manual_seed(args.seed + batch)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=generator).to(device)
    kwargs = generate_kwargs(mode, args.new_tokens, compile_config)
    compiled = mode in COMPILED_MODES
    warmup, repeats = (args.warmup, args.repeats) if compiled else (1, 1)
    record: dict[str, Any] = {"mode": mode, "batch": batch, "status": "running"}
    _peak_reset(device)
    cache = reused_cache(model, args.prompt_len + args.new_tokens) if mode == "reused" else None
    with deadline(args.compile_timeout if compiled else None):
        record["warmup_s"] = [timed_generate(model, input_ids, kwargs, cache)[0] for _ in range(warmup)]
    before = _compile_stats()
    seconds, recordings, output = [], [], None
    for _ in range(repeats):
        counts: list = []
        if getattr(args, "gc", False):
            gc.collect()  # outside the timing: every call then starts from the same allocator state
        with _counting_recordings(counts):
            elapsed, output = timed_generate(model, input_ids, kwargs, cache)
        seconds.append(elapsed)
        recordings.append(len(counts))
    after = _compile_stats()
    expected = (batch, args.prompt_len + args.new_tokens)
    if tuple(output.shape) != expected:
        raise RuntimeError(f"generate returned shape {tuple(output.shape)}, expected {expected}")
    median = statistics.median(seconds)
    record.update(
        status="ok",
        tokens_per_s=batch * args.new_tokens / median,
        seconds=median,
        seconds_all=seconds,
        cudagraph_recordings=recordings,  # per timed call: CUDA graphs recorded inside it
        # median of the timed calls that recorded none (None if every call recorded one)
        seconds_without_recordings=statistics.median(clean) if (clean := [
            s for s, r in zip(seconds, recordings) if r == 0]) else None,  # fmt: skip
        ms_per_step=1e3 * median / args.new_tokens,
        peak_GB=_peak_GB(device),
        new_tokens=output[:, args.prompt_len :].cpu().tolist(),
    )
    if compiled:
        record.update(after)
        record["compiled"] = after["graphs"] > 0
        record["recompiled_while_timed"] = after["graphs"] != before["graphs"]
    return record


def run_decode(variant: str, args, compile_config, device: torch.device, emit: Callable[[dict], None],
               log: Callable[[str], None]) -> dict:  # fmt: skip
    """Every decode run of one variant; a failing run is recorded and the next one still runs."""
    entry: dict[str, Any] = {"variant": variant, "status": "running", "runs": []}
    model = None
    try:
        check_available(variant)
        _reset_compiler()
        start = time.perf_counter()
        model = build_model(llama_config(args.shape), device, args.seed)
        _synchronize(device)
        entry["build_s"] = time.perf_counter() - start
        entry.update(make_variant(variant, model))
        entry["status"] = "ok"
        ops = f", ops: {entry['tritonbits_ops']}" if "tritonbits_ops" in entry else ""
        log(f"decode {variant}: built in {entry['build_s']:.1f} s, quantized in {entry['quantize_s']:.1f} s, "
            f"weights {entry['weights_GB']:.3g} GB ({entry['linear']}{ops})")  # fmt: skip
    except Unavailable as error:
        entry["status"] = f"unavailable: {error}"
    except Exception as error:
        traceback.print_exc()
        entry["status"] = f"error: {_short(error)}"
    emit(entry)
    if entry["status"] != "ok":
        log(f"decode {variant}: {entry['status']}")
        del model
        _release()
        return entry

    modes = ["static"] + (["reused"] if args.reused_cache else []) + (["eager"] if args.eager else [])
    timed_out = None
    for mode in modes:
        for batch in args.batches:
            if mode in COMPILED_MODES and timed_out:
                entry["runs"].append({"mode": mode, "batch": batch, "status": f"skipped: {timed_out}"})
                continue
            try:
                record = decode_run(model, mode, batch, args, compile_config)
            except CompileTimeout as error:
                timed_out = str(error)
                record = {"mode": mode, "batch": batch, "status": f"error: {error}"}
                _reset_compiler()
            except Exception as error:
                traceback.print_exc()
                record = {"mode": mode, "batch": batch, "status": f"error: {_short(error)}"}
            entry["runs"].append(record)
            log(format_decode_line(variant, record))
            emit(entry)
    del model
    _reset_compiler()
    _release()
    return entry


def format_decode_line(variant: str, record: dict) -> str:
    head = f"decode {variant:<13} {record['mode']:<6} batch {record['batch']:>3}:"
    if record["status"] != "ok":
        return f"{head} {record['status']}"
    warm = "+".join(f"{s:.1f}" for s in record["warmup_s"])
    extra = ""
    if record["mode"] in COMPILED_MODES:
        extra = f", {record['graphs']} graphs, {record['graph_breaks']} breaks"
        extra += ", RECOMPILED while timed" if record["recompiled_while_timed"] else ""
        if any(record.get("cudagraph_recordings", ())):
            extra += f", CUDA graphs recorded in the timed calls: {record['cudagraph_recordings']}"
            clean = record.get("seconds_without_recordings")
            if clean:
                tokens = record["tokens_per_s"] * record["seconds"]
                extra += f" (calls without: {clean:.3f} s, {tokens / clean:.1f} tok/s)"
        extra += "" if record["compiled"] else ", NOT compiled"
    peak = f", peak {record['peak_GB']:.1f} GB" if record.get("peak_GB") is not None else ""
    calls = "/".join(f"{s:.3f}" for s in record.get("seconds_all", ()))
    return (f"{head} {record['tokens_per_s']:9.1f} tok/s  ({record['seconds']:.3f} s a call [{calls}], warm-up {warm} s"
            f"{peak}{extra})")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# QLoRA training


def run_train(variant: str, args, device: torch.device, emit: Callable[[dict], None],
              log: Callable[[str], None]) -> dict:  # fmt: skip
    """LoRA on the ``variant`` model: tokens/s of forward + backward + AdamW step."""
    entry: dict[str, Any] = {"variant": variant, "status": "running"}
    model = optimizer = None
    try:
        peft = import_peer("peft")
        check_available(variant)
        start = time.perf_counter()
        model = build_model(llama_config(args.shape, args.train_layers), device, args.seed)
        entry.update(make_variant(variant, model))
        model.config.use_cache = False
        model.requires_grad_(False)
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = peft.LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = peft.get_peft_model(model, lora)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
        entry.update(
            trainable_params=sum(p.numel() for p in trainable),
            adapter_dtype=str(trainable[0].dtype).replace("torch.", ""),
            lora_layer=f"{type(wrapped).__module__}.{type(wrapped).__name__}",
            setup_s=time.perf_counter() - start,
        )
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        tokens = torch.randint(0, vocab, (args.train_batch, args.train_seq), generator=generator).to(device)

        def step() -> torch.Tensor:
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        start = time.perf_counter()
        losses = [step() for _ in range(args.train_warmup)]
        _synchronize(device)
        entry["warmup_s"] = time.perf_counter() - start
        _peak_reset(device)
        start = time.perf_counter()
        losses += [step() for _ in range(args.train_steps)]  # no .item() inside: no host syncs
        _synchronize(device)
        elapsed = time.perf_counter() - start
        losses = [float(loss) for loss in losses]
        if not all(math.isfinite(loss) for loss in losses):
            raise RuntimeError(f"non-finite loss: {losses}")
        entry.update(
            status="ok",
            tokens_per_s=args.train_steps * args.train_batch * args.train_seq / elapsed,
            ms_per_step=1e3 * elapsed / args.train_steps,
            peak_GB=_peak_GB(device),
            loss_first=losses[0],
            loss_last=losses[-1],
        )
    except Unavailable as error:
        entry["status"] = f"unavailable: {error}"
    except Exception as error:
        traceback.print_exc()
        entry["status"] = f"error: {_short(error)}"
    log(format_train_line(entry))
    emit(entry)
    del model, optimizer
    _release()
    return entry


def format_train_line(entry: dict) -> str:
    head = f"train  {entry['variant']:<13}:"
    if entry["status"] != "ok":
        return f"{head} {entry['status']}"
    peak = f", peak {entry['peak_GB']:.1f} GB" if entry.get("peak_GB") is not None else ""
    return (f"{head} {entry['tokens_per_s']:9.1f} tok/s  ({entry['ms_per_step']:.1f} ms a step, loss "
            f"{entry['loss_first']:.3f} -> {entry['loss_last']:.3f}{peak}, {entry['lora_layer']})")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# summary, document, table


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def decode_tokens_per_s(doc: dict, variant: str, batch: int, mode: str = "static") -> Optional[float]:
    entry = doc["decode"]["variants"].get(variant, {})
    for run in entry.get("runs", []):
        if run["mode"] == mode and run["batch"] == batch and run["status"] == "ok":
            return run["tokens_per_s"]
    return None


def train_tokens_per_s(doc: dict, variant: str) -> Optional[float]:
    entry = doc["train"]["variants"].get(variant, {})
    return entry.get("tokens_per_s") if entry.get("status") == "ok" else None


def token_agreement(doc: dict, batch: int, a: str = "tritonbits", b: str = "bitsandbytes") -> Optional[float]:
    """Fraction of greedy tokens equal in two variants (same weights and prompt; informative only:
    with random weights the logits are nearly flat, so one rounding difference changes the rest)."""
    runs = []
    for variant in (a, b):
        found = [r for r in doc["decode"]["variants"].get(variant, {}).get("runs", [])
                 if r["mode"] == "static" and r["batch"] == batch and r["status"] == "ok"]  # fmt: skip
        if not found:
            return None
        runs.append(found[0]["new_tokens"])
    pairs = [(x, y) for row_a, row_b in zip(*runs) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else None


def _target(text: str, rule: str, bound: float, ratio: Optional[float]) -> dict:
    met = None if ratio is None else (ratio >= bound if rule == ">=" else ratio > bound)
    return {"target": text, "rule": f"{rule} {bound:g}", "ratio": ratio, "met": met}


def summarize(doc: dict, batches: list[int]) -> dict:
    """The issue's targets (ratio of tokens/s), checked where both numbers exist (met: None)."""
    targets = []
    for mode in COMPILED_MODES:
        for batch in batches:
            for text, num, den, rule, bound in DECODE_TARGETS:
                ratio = _ratio(decode_tokens_per_s(doc, num, batch, mode), decode_tokens_per_s(doc, den, batch, mode))
                suffix = "" if mode == "static" else f", {mode} cache"
                targets.append(_target(f"{text}, batch {batch}{suffix}", rule, bound, ratio))
    text, num, den, rule, bound = TRAIN_TARGET
    targets.append(_target(text, rule, bound, _ratio(train_tokens_per_s(doc, num), train_tokens_per_s(doc, den))))
    agreement = {f"batch {b}": token_agreement(doc, b) for b in batches}
    return {"targets": targets, "greedy_token_agreement_tritonbits_vs_bitsandbytes": agreement}


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {
        "device": {"type": device.type, "name": name},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": version_of("triton"),
            "transformers": version_of("transformers"),
            "peft": version_of("peft"),
            "accelerate": version_of("accelerate"),
            "bitsandbytes": version_of("bitsandbytes"),
            "tritonbits": version_of("tritonbits"),
        },
        "TRITONBITS_BACKEND": os.environ.get("TRITONBITS_BACKEND", "auto"),
    }


def settings(args, compile_config) -> dict:
    return {
        "model": {"shape": args.shape, "name": "smoke (tiny Llama)" if args.smoke else "Llama-3-8B shape",
                  "weights": "random (seeded), bfloat16", "seed": args.seed},  # fmt: skip
        "quantization": {"load_in_4bit": True, **QUANT_SETTINGS, "lm_head": "bfloat16 (not quantized)"},
        "decode": {
            "batches": args.batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "warmup_calls": args.warmup, "timed_calls": args.repeats, "statistic": "median",
            "static": "generate(cache_implementation='static'); transformers compiles the forward",
            "reused": "generate(past_key_values=one StaticCache kept per batch size, reset before each call); "
                      "compiled the same way",
            "compile_config": "transformers default (inductor, reduce-overhead, fullgraph=False, dynamic=None)"
            if compile_config is None else {k: str(v) for k, v in compile_config.to_dict().items()},
            "tokens_per_s": "batch * new_tokens / seconds of one generate call (prefill included)",
            "eager": bool(args.eager), "reused_cache": bool(args.reused_cache),
            "gc_before_timed_calls": bool(getattr(args, "gc", False)),
            "compile_timeout_s": args.compile_timeout,
        },  # fmt: skip
        "train": {
            "layers": args.train_layers, "batch": args.train_batch, "seq_len": args.train_seq,
            "warmup_steps": args.train_warmup, "timed_steps": args.train_steps,
            "lora": {"r": args.lora_rank, "alpha": 2 * args.lora_rank, "dropout": 0.0, "targets": LORA_TARGETS},
            "gradient_checkpointing": bool(args.grad_ckpt), "optimizer": "torch.optim.AdamW (adapters only)",
            "dtypes": "base model bfloat16 (embedding, norms, lm_head not upcast); adapters float32 (peft default)",
            "tokens_per_s": "timed_steps * batch * seq_len / seconds",
        },  # fmt: skip
    }


def fmt(value: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def render(doc: dict) -> str:
    """The console table: decode per batch, then training, then the targets."""
    shown = ("torch", "triton", "transformers", "bitsandbytes", "tritonbits")
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k in shown)
    lines = [f"{doc['device']['name']}, {doc['date']}; {versions}"]
    dec = doc["settings"]["decode"]
    lines.append(f"decode: static KV cache + compile, prompt {dec['prompt_len']}, {dec['new_tokens']} new tokens, "
                 f"median of {dec['timed_calls']} after {dec['warmup_calls']} warm-ups"
                 + (", gc.collect() before each timed call" if dec.get("gc_before_timed_calls") else ""))  # fmt: skip
    header = ("variant", "mode", "batch", "tok/s", "s/call", "vs bnb", "vs bf16", "weights GB", "peak GB", "graphs",
              "breaks", "status")  # fmt: skip
    rows = []
    for variant, entry in doc["decode"]["variants"].items():
        if not entry.get("runs"):
            rows.append((variant, "", "", "", "", "", "", fmt(entry.get("weights_GB"), ".3g"), "", "", "",
                         entry["status"]))  # fmt: skip
        for run in entry.get("runs", []):
            ok = run["status"] == "ok"
            tps = run.get("tokens_per_s")
            batch, mode = run["batch"], run["mode"]

            def versus(other: str) -> str:
                if variant == other:
                    return ""
                return fmt(_ratio(tps, decode_tokens_per_s(doc, other, batch, mode)), ".2f", "x")

            rows.append((
                variant, mode, str(batch), fmt(tps), fmt(run.get("seconds"), ".3f"),
                versus("bitsandbytes"), versus("bf16"),
                fmt(entry.get("weights_GB"), ".3g"), fmt(run.get("peak_GB"), ".1f"),
                str(run.get("graphs", "")), str(run.get("graph_breaks", "")),
                "ok" if ok else run["status"],
            ))  # fmt: skip
    lines += _table(header, rows)
    tr = doc["settings"]["train"]
    lines.append("")
    lines.append(f"QLoRA training: {tr['layers']} layers, LoRA r={tr['lora']['r']} on {len(tr['lora']['targets'])} "
                 f"projections, batch {tr['batch']} x {tr['seq_len']}, gradient checkpointing "
                 f"{'on' if tr['gradient_checkpointing'] else 'off'}, {tr['timed_steps']} timed steps")  # fmt: skip
    header = ("variant", "tok/s", "ms/step", "vs bnb", "peak GB", "loss first -> last", "status")
    rows = []
    bnb_train = train_tokens_per_s(doc, "bitsandbytes")
    for variant, entry in doc["train"]["variants"].items():
        ok = entry["status"] == "ok"
        rows.append((
            variant, fmt(entry.get("tokens_per_s")), fmt(entry.get("ms_per_step")),
            fmt(_ratio(entry.get("tokens_per_s"), bnb_train), ".2f", "x") if variant != "bitsandbytes" else "",
            fmt(entry.get("peak_GB"), ".1f"),
            f"{entry['loss_first']:.3f} -> {entry['loss_last']:.3f}" if ok else "", "ok" if ok else entry["status"],
        ))  # fmt: skip
    lines += _table(header, rows, left=1)
    lines.append("")
    for target in doc.get("summary", {}).get("targets", []):
        verdict = "n/a" if target["met"] is None else "met" if target["met"] else "MISS"
        lines.append(f"target: {target['target']}: {fmt(target['ratio'], '.2f', 'x') or 'not measured'} -> {verdict}")
    if doc["device"]["type"] != "cuda":
        lines.append("(CPU smoke run: the numbers exercise the code path and say nothing about GPU speed)")
    return "\n".join(lines)


def _table(header: tuple, rows: list[tuple], left: int = 2) -> list[str]:
    """Aligned columns: the first ``left`` and the last left-aligned, numbers right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        last = len(cells) - 1
        return "  ".join(
            str(c).ljust(w) if i < left or i == last else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header)] + [line(row) for row in rows]


def write_json(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "e2e.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    return names


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for e2e.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (or --device), small sizes")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--only", choices=("decode", "train"), default=None, help="run one part only")
    parser.add_argument("--variants", type=_names, default=list(VARIANTS), help="decode variants (default: all)")
    parser.add_argument("--train-variants", type=_names, default=["tritonbits", "bitsandbytes"])
    parser.add_argument("--batches", type=_ints, default=None, help="decode batch sizes (default 1,8; smoke 1,2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 16 (smoke 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (smoke 8)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up generate calls of the same shape")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate calls (default 3; smoke 1)")
    parser.add_argument("--reused-cache", action="store_true",
                        help="also decode with one kept StaticCache per batch size (mode 'reused')")
    parser.add_argument("--gc", action="store_true", help="gc.collect() before every timed generate call (untimed)")
    parser.add_argument("--eager", action="store_true", help="also decode without static cache or compile (slow)")
    parser.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True (fail on graph breaks)")
    parser.add_argument("--compile-backend", default=None,
                        help="default: transformers' (inductor) on CUDA; 'eager' with --smoke (Dynamo tracing only)")
    parser.add_argument("--compile-timeout", type=float, default=240.0,
                        help="seconds allowed for the warm-up calls of one variant and batch (default %(default)s)")
    parser.add_argument("--train-layers", type=int, default=None, help="default 32 (the full 8B shape; smoke 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="default 4 (smoke 2)")
    parser.add_argument("--train-seq", type=int, default=None, help="default 512 (smoke 32)")
    parser.add_argument("--train-warmup", type=int, default=None, help="default 3 (smoke 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="default 10 (smoke 2)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no gradient checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="exit 1 if a tritonbits measurement failed")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = dict(
        batches=[1, 2] if smoke else [1, 8], prompt_len=8 if smoke else 16, new_tokens=8 if smoke else 64,
        repeats=1 if smoke else 3, train_layers=2 if smoke else 32, train_batch=2 if smoke else 4,
        train_seq=32 if smoke else 512, train_warmup=1 if smoke else 3, train_steps=2 if smoke else 10,
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("warmup", "repeats", "new_tokens", "prompt_len", "train_steps", "train_batch", "train_seq"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}")
    args.shape = SMOKE if smoke else LLAMA3_8B
    return args


def compile_config_for(args, device: torch.device):
    """None (transformers' default) on CUDA unless asked otherwise; on other devices a config that
    lets generate compile there (transformers compiles on its own only on accelerators)."""
    if device.type == "cuda" and args.compile_backend in (None, "inductor") and not args.fullgraph:
        return None
    from transformers import CompileConfig

    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
    config = CompileConfig(fullgraph=args.fullgraph or device.type != "cuda", backend=backend, mode=mode)
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("e2e.py: no CUDA device; use --smoke for the CPU code path", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)

    def log(line: str) -> None:
        # seconds since the start on every progress line: where a run's time went (compiles)
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        print(f"[{elapsed:5.0f} s] {line}" if line else "", flush=True)

    compile_config = compile_config_for(args, device)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "complete": False,
        "smoke": bool(args.smoke),
        **environment(device),
        "settings": settings(args, compile_config),
        "decode": {"variants": {}},
        "train": {"variants": {}},
    }
    log(f"{doc['device']['name']} | {doc['versions']}")

    def emitter(part: str) -> Callable[[dict], None]:
        def emit(entry: dict) -> None:
            doc[part]["variants"][entry["variant"]] = entry
            doc["summary"] = summarize(doc, args.batches)
            doc["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
            write_json(doc, args.out)

        return emit

    # Training first: it compiles nothing and takes seconds, so a decode compile that runs long
    # cannot cost its numbers.
    if args.only in (None, "train"):
        for variant in args.train_variants:
            run_train(variant, args, device, emitter("train"), log)
    if args.only in (None, "decode"):
        for variant in args.variants:
            run_decode(variant, args, compile_config, device, emitter("decode"), log)

    doc["summary"] = summarize(doc, args.batches)
    doc["complete"] = True
    doc["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    path = write_json(doc, args.out)
    print(f"\n{render(doc)}\nwrote {path} ({doc['elapsed_s']:.0f} s)", flush=True)
    return 1 if args.strict and not tritonbits_ok(doc) else 0


def tritonbits_ok(doc: dict) -> bool:
    """Whether every tritonbits measurement in ``doc`` succeeded."""
    entries = [doc[part]["variants"].get("tritonbits") for part in ("decode", "train")]
    statuses = [s for e in entries if e for s in [e["status"]] + [r["status"] for r in e.get("runs", [])]]
    return all(s == "ok" for s in statuses)


if __name__ == "__main__":
    raise SystemExit(main())
