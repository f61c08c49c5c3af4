"""The benchmark machinery: cases, timing, rotating inputs, ceilings, peers that may be missing.

A *case* is one operation at one size (a stable ``id`` such as
``quant4.quantize_4bit.nf4.bs64.8192x8192.bf16``), timed for up to three *implementations* on the
same inputs:

- ``tritonbits``: ours, through the public API a user calls;
- ``bitsandbytes``: bitsandbytes 0.50.2, the package we replace (may be missing: "unavailable");
- ``torch``: plain PyTorch (our pure-PyTorch reference op, ``nn.Linear``, ``torch.optim`` ...).

Each implementation is a factory ``make(inputs) -> Timed``; it raises :class:`Unavailable` when
the code it needs cannot be imported, and any other exception is recorded as an error. Nothing a
peer does can stop the run.

Timing (:func:`measure`):

- CUDA: one CUDA-event pair around each call, median over the repetitions (as
  ``triton.testing.do_bench``), after a warm-up that also absorbs Triton's JIT and autotuning.
- CPU (``--quick`` in CI): ``time.perf_counter`` per call, median. These are wall-clock CPU
  numbers that only exercise the code path; they say nothing about GPU speed.

CUDA graphs (cases with ``graph=True``, the decode sizes of the layer groups): the same calls are
also captured in one graph and replayed (:func:`measure_graph`), which takes the host out; the
result is ``graph_ms`` beside the eager ``ms``.

Rotating inputs: when one call touches less than twice the L2 cache, the timed calls cycle over
several copies of the arguments, so that each call finds its inputs in device memory, not in L2,
as it would inside a model. Calls that move more than that use a single copy.

Units: times in milliseconds; bandwidth in GB/s (1e9 bytes/s); rates in TFLOP/s (1e12/s).
"""

from __future__ import annotations

import gc
import importlib
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch

IMPLS = ("tritonbits", "bitsandbytes", "torch")

# Without a GPU there is no L2 to defeat; a nominal size still lets --quick exercise rotation.
CPU_NOMINAL_CACHE_BYTES = 1 << 20
MAX_REPLICAS = 32


class Unavailable(Exception):
    """An implementation cannot run here (missing package, class not written yet, no GPU...)."""


@dataclass
class Timed:
    """One implementation of a case, ready to time: ``fn(*args)`` is the timed call.

    Attributes:
        fn: the call to time; its result is discarded.
        args: the arguments of one call (tensors are cloned to make rotation replicas).
        label: what is timed, in words ("bnb quantize_4bit", "torch fused AdamW").
        check: run once after timing; returns metrics such as ``{"rel_err": 0.092}``.
        replicate: makes another argument tuple for rotation (default: clone every tensor in
            ``args``); give it when args hold objects that cloning tensors would not copy.
        max_replicas: 1 for calls that carry state from call to call (optimizer steps).
        backend: which code serves the call ("triton", "torch-ref", ...), when known.
        bytes: bytes this implementation moves per call when they differ from the case's (a bf16
            ``nn.Linear`` reads 4x the weight bytes of an NF4 layer); None: ``Case.bytes``.
        not_capturable: why the call cannot run inside a CUDA graph (a host sync), when the case
            asks for graph timing; None: it is captured.
    """

    fn: Callable[..., Any]
    args: tuple = ()
    label: str = ""
    check: Optional[Callable[[], dict]] = None
    replicate: Optional[Callable[[], tuple]] = None
    max_replicas: int = MAX_REPLICAS
    backend: Optional[str] = None
    bytes: Optional[int] = None
    not_capturable: Optional[str] = None


@dataclass
class Case:
    """One operation at one size, timed for each implementation present in ``impls``.

    Attributes:
        id: stable identifier ``group.op.variant...``; results of different runs are matched on it.
        group: the group that registered the case.
        title: short human description (printed).
        impls: implementation name (one of IMPLS) -> factory ``make(inputs) -> Timed``.
        setup: makes the inputs shared by every implementation (seeded; called once per case).
        bytes: bytes one call must read + write (the memory floor), or None.
        flops: floating-point (or integer) operations of one call, or None.
        limit: the ceiling the fraction is taken of: "copy" (bytes / copy bandwidth) or "matmul"
            (flops / bf16 matmul rate).
        target: the fraction of ``limit`` tritonbits must reach (the issue's floor), or None.
        provides: for ceiling cases, the key of ``Context.ceilings`` this case measures.
        info: extra facts recorded with the case (shape, blocksize, ...).
        graph: also time the calls replayed from a CUDA graph (``graph_ms``): the kernels alone,
            as a decode step captured by ``torch.compile(mode="reduce-overhead")`` runs them.
            For decode sizes, where eager calls measure the host more than the GPU.
    """

    id: str
    group: str
    title: str
    impls: dict[str, Callable[[Any], Timed]]
    setup: Callable[[], Any] = lambda: None
    bytes: Optional[int] = None
    flops: Optional[int] = None
    limit: str = "copy"
    target: Optional[float] = None
    provides: Optional[str] = None
    info: dict = field(default_factory=dict)
    graph: bool = False


@dataclass
class Context:
    """What every group needs to know about this run.

    Attributes:
        device: where the cases run ("cuda" on the GPU machine, "cpu" in CI).
        quick: tiny sizes and short timings (CI; smoke runs on the GPU).
        seed: base seed; each case seeds its own generator from it and its id.
        rep_ms: target time spent in timed repetitions per implementation.
        ceilings: filled by the ceilings group: "copy_GBps", "matmul_TFLOPs", "int8_mm_TOPs".
    """

    device: torch.device
    quick: bool = False
    seed: int = 0
    rep_ms: float = 200.0
    warmup_ms: float = 25.0
    min_reps: int = 10
    ceilings: dict = field(default_factory=dict)

    @property
    def max_replicas(self) -> int:
        """Cap on rotation copies: 32 on CUDA; 2 on CPU, enough to exercise the path cheaply."""
        return MAX_REPLICAS if self.is_cuda else 2

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cache_bytes(self) -> int:
        """Bytes of last-level cache the rotation must defeat (L2 on CUDA, a nominal 1 MiB on CPU)."""
        if self.is_cuda:
            return int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 << 20))
        return CPU_NOMINAL_CACHE_BYTES

    @property
    def replica_budget_bytes(self) -> int:
        """Memory the extra rotation copies may use in all."""
        if self.is_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return min(8 << 30, free // 4)
        return 64 << 20

    def generator(self, key: str) -> torch.Generator:
        """A generator on ``device`` seeded from the base seed and ``key`` (a case id)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + _stable_hash(key))
        return gen

    def randn(self, shape, dtype: torch.dtype, key: str) -> torch.Tensor:
        """Seeded standard-normal tensor on ``device`` (never zeros: quantizers see real scales)."""
        return torch.randn(shape, generator=self.generator(key), device=self.device, dtype=torch.float32).to(dtype)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def _stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (Python's hash() is salted)."""
    value = 0
    for byte in text.encode():
        value = (value * 131 + byte) % 2_147_483_647
    return value


# ---------------------------------------------------------------------------------------------
# peers


@lru_cache(maxsize=None)
def _import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as error:  # a broken wheel raises more than ImportError
        first_line = str(error).splitlines()[0] if str(error) else ""
        return None, f"{module} not importable ({type(error).__name__}: {first_line})"


def import_peer(module: str):
    """Import ``module`` or raise :class:`Unavailable` saying why (the answer is cached)."""
    loaded, reason = _import(module)
    if loaded is None:
        raise Unavailable(reason)
    return loaded


def resolve(dotted: str):
    """``"tritonbits.nn.Linear4bit"`` -> the object, or :class:`Unavailable` naming what is missing.

    Walks attributes from the top package and imports submodules as needed, so it works for
    tritonbits' lazy submodules and for classes other engineers have not written yet.
    """
    parts = dotted.split(".")
    obj = import_peer(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            prefix = ".".join(parts[: i + 1])
            loaded, reason = _import(prefix)
            if loaded is None:
                raise Unavailable(f"{dotted}: {reason}") from None
            obj = loaded
    return obj


def version_of(module: str) -> Optional[str]:
    loaded, _ = _import(module)
    return getattr(loaded, "__version__", "unknown") if loaded is not None else None


# ---------------------------------------------------------------------------------------------
# measurement helpers


def dense_linear(inputs) -> Timed:
    """The torch.nn.Linear baseline of a layer group: inputs (W [N, K], x [M, K], expected)."""
    W, x, expected = inputs
    N, K = W.shape

    def build():
        layer = torch.nn.Linear(K, N, bias=False, dtype=W.dtype, device=W.device)
        layer.weight.copy_(W)
        return layer

    layer = build()
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(W.dtype, str(W.dtype).removeprefix("torch."))
    return Timed(
        fn=lambda layer, x: layer(x),
        args=(layer, x),
        label=f"torch.nn.Linear {name}",
        check=lambda: {"rel_err": rel_err(expected, layer(x))},
        replicate=lambda: (build(), x),
        bytes=2 * N * K,
    )


def rel_err(reference: torch.Tensor, value: torch.Tensor) -> float:
    """||reference - value|| / ||reference|| in float64 (the reference log's rel_err)."""
    ref = reference.detach().double().reshape(-1)
    diff = ref - value.detach().double().reshape(-1).to(ref.device)
    denom = ref.norm().item()
    return diff.norm().item() / denom if denom else float(diff.norm().item())


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in ``obj`` (tensors, sequences, dicts, modules; others count 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(t) for t in obj.parameters()) + sum(tensor_bytes(t) for t in obj.buffers())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return 0


def clone_args(args: tuple) -> tuple:
    """A copy of ``args`` with every tensor (also inside lists, tuples, dicts) cloned."""

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.clone()
        if isinstance(x, (list, tuple)):
            return type(x)(clone(y) for y in x)
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        return x

    return tuple(clone(a) for a in args)


def replica_count(bytes_per_call: int, args_bytes: int, cache_bytes: int, budget_bytes: int, cap: int) -> int:
    """How many argument copies to cycle over so that no call finds its data in cache.

    Enough copies that the bytes touched between two uses of one copy exceed twice the cache,
    bounded by ``cap`` and by ``budget_bytes`` for the extra copies.
    """
    if bytes_per_call <= 0 or cap <= 1:
        return 1
    wanted = math.ceil(2 * cache_bytes / bytes_per_call)
    if args_bytes > 0:
        wanted = min(wanted, 1 + budget_bytes // args_bytes)
    return max(1, min(cap, wanted))


@dataclass
class Timing:
    """Result of :func:`measure`: per-call times in ms (median and the 20th/80th percentiles)."""

    ms: float
    ms_p20: float
    ms_p80: float
    reps: int
    replicas: int
    clock: str


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(fn: Callable, arg_sets: list[tuple], ctx: Context, max_reps: int = 2000) -> Timing:
    """Time ``fn(*arg_sets[i % len(arg_sets)])``: warm-up, then per-call timings, median.

    The first call (JIT, autotune, lazy state) is never timed. The repetition count is chosen
    from a short estimate so that the timed calls take about ``ctx.rep_ms``.
    """
    n_sets = len(arg_sets)
    fn(*arg_sets[0])
    ctx.synchronize()

    if ctx.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(5):
            fn(*arg_sets[i % n_sets])
        end.record()
        torch.cuda.synchronize(ctx.device)
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
    else:
        t0 = time.perf_counter()
        fn(*arg_sets[0 % n_sets])
        estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)

    reps = int(max(ctx.min_reps, min(max_reps, ctx.rep_ms / estimate)))
    for i in range(int(min(max_reps, max(1, ctx.warmup_ms / estimate)))):
        fn(*arg_sets[i % n_sets])
    ctx.synchronize()

    if ctx.is_cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(*arg_sets[i % n_sets])
            ends[i].record()
        torch.cuda.synchronize(ctx.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        clock = "cuda events"
    else:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*arg_sets[i % n_sets])
            times.append((time.perf_counter() - t0) * 1e3)
        clock = "cpu wall clock (perf_counter)"
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps, n_sets, clock)


def measure_graph(fn: Callable, arg_sets: list[tuple], ctx: Context, replays: int = 7) -> float:
    """Median time per call (ms) of calls replayed from one CUDA graph: one call per argument set
    (at least 8 calls, cycling over the sets), captured after warm-up calls on a side stream."""
    calls = max(8, len(arg_sets))
    stream = torch.cuda.Stream(ctx.device)
    stream.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.current_stream(ctx.device).wait_stream(stream)
    torch.cuda.synchronize(ctx.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*arg_sets[i % len(arg_sets)])
    graph.replay()
    torch.cuda.synchronize(ctx.device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def _release(ctx: Context) -> None:
    """Give device memory back between implementations (a 1B-parameter optimizer holds 13+ GB).

    Only on CUDA: on CPU a full gc pass costs more than the tiny cases it would free.
    """
    if ctx.is_cuda:
        gc.collect()
        torch.cuda.empty_cache()


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def run_impl(case: Case, name: str, inputs, ctx: Context) -> dict:
    """Prepare, time and check one implementation; always returns a result dict (never raises)."""
    record: dict = {"impl": name}
    try:
        timed = case.impls[name](inputs)
    except Unavailable as why:
        record["status"] = f"unavailable: {why}"
        return record
    except Exception as error:
        record["status"] = f"error in setup: {_short(error)}"
        _release(ctx)
        return record
    record.update(label=timed.label, backend=timed.backend)
    if timed.bytes:
        record["bytes"] = timed.bytes
    try:
        args_bytes = tensor_bytes(timed.args)
        moved = timed.bytes or case.bytes
        per_call = moved or args_bytes
        cap = min(timed.max_replicas, ctx.max_replicas)
        n = replica_count(per_call, args_bytes, ctx.cache_bytes, ctx.replica_budget_bytes, cap)
        make = timed.replicate or (lambda: clone_args(timed.args))
        arg_sets = [timed.args] + [make() for _ in range(n - 1)]
        timing = measure(timed.fn, arg_sets, ctx)
    except Exception as error:
        record["status"] = f"error: {_short(error)}"
        _release(ctx)
        return record
    if case.graph and ctx.is_cuda:
        if timed.not_capturable:
            record["graph_status"] = f"not capturable: {timed.not_capturable}"
        else:
            try:
                record["graph_ms"] = measure_graph(timed.fn, arg_sets, ctx)
            except Exception as error:
                record["graph_status"] = f"error: {_short(error)}"
    del arg_sets
    record.update(status="ok", ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80)
    record.update(reps=timing.reps, replicas=timing.replicas, clock=timing.clock)
    ceilings = {} if case.provides else ctx.ceilings  # a ceiling is not a fraction of another
    record.update(rates(timed.bytes or case.bytes, case.flops, timing.ms, ceilings))
    if case.info.get("params"):  # optimizer steps: time per billion parameters, as the reference log
        record["ms_per_Bparam"] = timing.ms / (case.info["params"] / 1e9)
    if timed.check is not None:
        try:
            record.update(timed.check())
        except Unavailable as why:
            record["check"] = f"unavailable: {why}"
        except Exception as error:
            record["check"] = f"error: {_short(error)}"
    del timed
    _release(ctx)
    return record


def rates(nbytes: Optional[int], flops: Optional[int], ms: float, ceilings: dict) -> dict:
    """GB/s, TFLOP/s and the fractions of the measured ceilings reached at ``ms`` per call."""
    out: dict = {}
    if nbytes:
        out["GBps"] = nbytes / (ms * 1e6)
        if ceilings.get("copy_GBps"):
            out["frac_copy"] = out["GBps"] / ceilings["copy_GBps"]
    if flops:
        out["TFLOPs"] = flops / (ms * 1e9)
        if ceilings.get("matmul_TFLOPs"):
            out["frac_matmul"] = out["TFLOPs"] / ceilings["matmul_TFLOPs"]
    return out


def frac_of_limit(case_record: dict, impl: str) -> Optional[float]:
    """The fraction of its case's limit that ``impl`` reached (None if not measured)."""
    result = case_record["results"].get(impl, {})
    key = "frac_matmul" if case_record.get("limit") == "matmul" else "frac_copy"
    return result.get(key)


def run_case(case: Case, ctx: Context, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run every implementation of ``case`` on the same inputs; the record that goes in the JSON."""
    record = {
        "id": case.id,
        "group": case.group,
        "title": case.title,
        "bytes": case.bytes,
        "flops": case.flops,
        "limit": case.limit,
        "target": case.target,
        "info": case.info,
        "results": {},
    }
    try:
        with torch.no_grad():
            inputs = case.setup()
    except Exception as error:
        record["status"] = f"error in inputs: {_short(error)}"
        log(format_line(record, None))
        return record
    for name in IMPLS:
        if name not in case.impls:
            continue
        with torch.no_grad():
            result = run_impl(case, name, inputs, ctx)
        record["results"][name] = result
        log(format_line(record, name))
    del inputs
    _release(ctx)

    ours, bnb, ref = (record["results"].get(k, {}) for k in IMPLS)
    if ours.get("ms") and bnb.get("ms"):
        record["bnb_over_ours"] = bnb["ms"] / ours["ms"]
    if ours.get("ms") and ref.get("ms"):
        record["torch_over_ours"] = ref["ms"] / ours["ms"]
    if ours.get("graph_ms") and bnb.get("graph_ms"):
        record["bnb_over_ours_graph"] = bnb["graph_ms"] / ours["graph_ms"]
    if ours.get("graph_ms") and ref.get("graph_ms"):
        record["torch_over_ours_graph"] = ref["graph_ms"] / ours["graph_ms"]
    if case.provides:
        provider = next((r for r in record["results"].values() if r.get("ms")), None)
        if provider is not None:
            value = provider.get("GBps") if case.provides.endswith("GBps") else provider.get("TFLOPs")
            if value:
                ctx.ceilings[case.provides] = value
                record["ceiling"] = {case.provides: value}
    return record


def _fmt(value: Optional[float], spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def format_line(record: dict, impl: Optional[str]) -> str:
    """One log line, in the reference log's shape: group, impl, title, ms, then key=value pairs."""
    head = f"{record['group']:<9} {impl or '-':<12} {record['title']:<46}"
    if impl is None:
        return f"{head} {record.get('status', '')}"
    result = record["results"][impl]
    if result.get("status") != "ok":
        return f"{head} {result.get('status')}"
    pairs = []
    for key in ("GBps", "frac_copy", "TFLOPs", "frac_matmul"):
        if key in result:
            pairs.append(f"{key}={result[key]:.3g}")
    for key, value in result.items():
        if key in _LINE_SKIP or key in ("GBps", "frac_copy", "TFLOPs", "frac_matmul") or value is None:
            continue
        pairs.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return f"{head} {result['ms']:9.4f} ms  " + " ".join(pairs)


_LINE_SKIP = {"impl", "status", "ms", "ms_p20", "ms_p80", "reps", "replicas", "clock", "label", "bytes", "graph_status"}


def run_cases(cases: Iterable[Case], ctx: Context, log: Callable[[str], None]) -> list[dict]:
    return [run_case(case, ctx, log) for case in cases]


# ---------------------------------------------------------------------------------------------
# what serves tritonbits' ops


def tritonbits_backend(op: str, device: torch.device) -> str:
    """"triton" if tritonbits sends ``op`` on ``device`` to a Triton kernel, else "torch-ref".

    Recorded with every tritonbits timing, so a table never passes off the PyTorch reference as
    a kernel.
    """
    registry = resolve("tritonbits.backends.registry")
    served = registry.triton_device_types(registry.selected_backend())
    return "triton" if op in registry.TRITON_KERNELS and device.type in served else "torch-ref"


# ---------------------------------------------------------------------------------------------
# ceilings: what the hardware can do, measured in the same process as the cases


def copy_ceiling_case(ctx: Context) -> Case:
    """Device-to-device copy of a large float32 tensor (1 GiB; 4 MiB with --quick).

    Bytes counted: read + write (2 x the tensor). This is the bandwidth every memory-bound case
    is measured against.
    """
    numel = 1 << 20 if ctx.quick else 1 << 28
    nbytes = numel * 4

    def setup():
        return ctx.randn((numel,), torch.float32, "ceiling.copy"), torch.empty(numel, device=ctx.device)

    def make(inputs) -> Timed:
        src, dst = inputs
        return Timed(fn=lambda d, s: d.copy_(s), args=(dst, src), label="torch Tensor.copy_", max_replicas=1)

    size = f"{nbytes >> 20}MiB" if nbytes < 1 << 30 else f"{nbytes >> 30}GiB"
    return Case(
        id=f"ceilings.copy.fp32.{size}",
        group="ceilings",
        title=f"d2d copy fp32 {size}",
        impls={"torch": make},
        setup=setup,
        bytes=2 * nbytes,
        provides="copy_GBps",
        info={"numel": numel},
    )


def matmul_ceiling_case(ctx: Context, dtype: torch.dtype = torch.bfloat16) -> Case:
    """Square matmul on random data: 8192^3 (256^3 with --quick); bf16 -> TFLOP/s, int8 -> TOP/s.

    bf16 uses ``torch.matmul``; int8 uses ``torch._int_mm`` (int32 accumulation), the rate
    LLM.int8() layers are measured against.
    """
    n = 256 if ctx.quick else 8192
    is_int8 = dtype == torch.int8
    key = f"ceiling.matmul.{dtype}"

    def setup():
        if is_int8:
            gen = ctx.generator(key)
            a = torch.randint(-127, 128, (n, n), generator=gen, device=ctx.device, dtype=torch.int8)
            b = torch.randint(-127, 128, (n, n), generator=gen, device=ctx.device, dtype=torch.int8)
            # cuBLASLt's int8 kernels want B column-major; a row-major B takes a path ~7x slower.
            return a, b.t()
        return ctx.randn((n, n), dtype, key + ".a"), ctx.randn((n, n), dtype, key + ".b")

    def make(inputs) -> Timed:
        a, b = inputs
        if is_int8:
            if not hasattr(torch, "_int_mm"):
                raise Unavailable("torch._int_mm missing in this torch")
            return Timed(fn=torch._int_mm, args=(a, b), label="torch._int_mm", max_replicas=1)
        return Timed(fn=torch.matmul, args=(a, b), label="torch.matmul", max_replicas=1)

    name = "int8" if is_int8 else str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    return Case(
        id=f"ceilings.matmul.{name}.{n}",
        group="ceilings",
        title=f"{name} matmul {n}^3",
        impls={"torch": make},
        setup=setup,
        flops=2 * n**3,
        limit="matmul",
        provides="int8_mm_TOPs" if is_int8 else "matmul_TFLOPs",
        info={"n": n, "dtype": str(dtype)},
    )
