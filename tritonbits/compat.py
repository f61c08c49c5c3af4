"""How tritonbits' public surface maps onto bitsandbytes 0.50.2's, as data the tests check.

- :data:`MODULES`: the bitsandbytes modules whose public names tritonbits mirrors, and where.
- :data:`LEFT_OUT`: per bitsandbytes module, each public name tritonbits deliberately does not
  provide, with a one-line reason. Every other public name exists in the matching tritonbits
  module with bitsandbytes' parameter names, order, kinds and defaults (``tests/test_public_surface.py``).
- :data:`SIGNATURE_RULE`: the one way a tritonbits signature may differ (extra keyword-only
  parameters with defaults, after bitsandbytes' parameters; callers of bitsandbytes never see them).
- :data:`DEVIATIONS`: names that exist with bitsandbytes' signature but behave differently on
  purpose, with the reason.
- :data:`FEATURES`: bitsandbytes' features and their status here; rendered as the README table by
  :func:`features_markdown` (``python -m tritonbits.compat --write-readme`` refreshes it).

The helpers :func:`public_names` and :func:`signature_problems` define "public" and "same
signature" once, for the test and for anyone auditing by hand. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BITSANDBYTES_VERSION",
    "DEVIATIONS",
    "EXTRA_PUBLIC",
    "FEATURES",
    "LEFT_OUT",
    "MODULES",
    "SIGNATURE_RULE",
    "Feature",
    "features_markdown",
    "public_names",
    "signature_problems",
    "update_readme",
]

BITSANDBYTES_VERSION = "0.50.2"

# bitsandbytes module -> the tritonbits module holding the same public names.
MODULES = {
    "bitsandbytes": "tritonbits",
    "bitsandbytes.functional": "tritonbits.functional",
    "bitsandbytes.nn": "tritonbits.nn",
    "bitsandbytes.optim": "tritonbits.optim",
    "bitsandbytes.utils": "tritonbits.utils",
}

# Names public by convention although they start with an underscore.
EXTRA_PUBLIC = {"bitsandbytes": ("__version__",)}

_NATIVE = "handle or helper of bitsandbytes' compiled C/CUDA library; tritonbits ships no native library"
_PAGING = "CUDA unified-memory paging through the C library; paged optimizers keep state in pinned host memory instead"
_IGEMM = "deprecated in bitsandbytes 0.50 (FutureWarning); use int8_linear_matmul"
_ALIAS = "import side effect in bitsandbytes (a submodule bound by `from . import`), not an API"

LEFT_OUT: dict[str, dict[str, str]] = {
    "bitsandbytes": {
        "adam": _ALIAS + "; tritonbits.optim.adam exists",
        "cextension": "loads bitsandbytes' native library; tritonbits has none (Triton compiles at run time)",
        "consts": "paths and URLs of bitsandbytes' native-library set-up",
        "cpu_ops": _ALIAS + " (backends.cpu.ops); backends are chosen by TRITONBITS_BACKEND",
        "cuda_specs": "CUDA-version probing for picking a native library; tritonbits.device asks torch",
        "default_ops": _ALIAS + " (backends.default.ops); references live in tritonbits.backends.torch",
        "modules": _ALIAS + " (nn.modules); tritonbits.nn splits the layers by family",
    },
    "bitsandbytes.functional": {
        "C": "internal int8 scale constant (127.0) of bitsandbytes' implementation",
        "CUBLAS_Context": "cuBLAS handles for the C library; Triton kernels and torch._int_mm need none",
        "FIRST_CUDA_DEVICE": "a torch.device('cuda', 0) default for the paging helpers; see get_paged",
        "GlobalPageManager": _PAGING,
        "batched_igemm": _IGEMM,
        "check_matmul": _IGEMM,
        "elementwise_func": _PAGING + " (element-wise fill/arange on paged tensors)",
        "fill": _PAGING + " (element-wise fill on paged tensors)",
        "get_paged": _PAGING,
        "get_ptr": _NATIVE + " (ctypes pointers)",
        "has_avx512bf16": "CPU feature probe for bitsandbytes' native CPU kernels; the PyTorch path needs none",
        "igemm": _IGEMM,
        "lib": _NATIVE,
        "name2qmap": "internal cache of code tables; tritonbits.codebooks caches per device",
        "prefetch_tensor": _PAGING,
    },
    "bitsandbytes.nn": {
        "modules": "bitsandbytes' single layer file; tritonbits.nn has one module per layer family",
    },
    "bitsandbytes.optim": {
        "adamw": "bitsandbytes' file for the AdamW classes; in tritonbits they live in tritonbits.optim.adam",
    },
    "bitsandbytes.utils": {},
}

SIGNATURE_RULE = (
    "same parameter names, order, kinds and defaults as bitsandbytes; tritonbits may append "
    "keyword-only parameters that have defaults"
)

# Present with bitsandbytes' signature, different behaviour on purpose.
DEVIATIONS: dict[str, str] = {
    "bitsandbytes.nn.OutlierAwareLinear.forward": (
        "returns forward_with_outliers(x, outlier_idx); bitsandbytes' forward returns None"
    ),
    "bitsandbytes.nn.StableEmbedding": (
        "passes device and dtype to torch.nn.Embedding by keyword; bitsandbytes passes them by position, "
        "into _freeze and device, so its dtype= argument fails"
    ),
    "bitsandbytes.functional.int8_mm_dequant": "scales by exactly 1/127**2, not bitsandbytes' 6.200124e-05",
    "bitsandbytes.functional.get_4bit_type": "device=None gives a CPU tensor (bitsandbytes defaults to cuda)",
    "bitsandbytes.functional.QuantState.to": "returns the state, so calls chain (bitsandbytes returns None)",
    "bitsandbytes.optim": (
        "optimizer constructors also take keyword-only percentile_clipping=100 and block_wise=True; "
        "paged optimizers stream state from pinned host memory instead of CUDA unified memory"
    ),
}


class Feature(NamedTuple):
    """One row of the README feature table.

    ``names``: bitsandbytes names as ``"module:name"`` (``module`` a key of :data:`MODULES`). With
    status ``"yes"`` each must exist in tritonbits; with ``"left out"`` each must be in
    :data:`LEFT_OUT`. The test checks both, so the table cannot claim what the code lacks.
    """

    feature: str
    names: tuple[str, ...]
    status: str  # "yes" or "left out"
    note: str


FEATURES: tuple[Feature, ...] = (
    Feature(
        "8-bit blockwise quantization (dynamic code)",
        ("bitsandbytes.functional:quantize_blockwise", "bitsandbytes.functional:dequantize_blockwise"),
        "yes",
        "same codes and absmax; Triton kernels on GPU",
    ),
    Feature(
        "4-bit NF4/FP4 quantization, nested absmax, `QuantState` (de)serialization",
        (
            "bitsandbytes.functional:quantize_4bit",
            "bitsandbytes.functional:dequantize_4bit",
            "bitsandbytes.functional:quantize_nf4",
            "bitsandbytes.functional:quantize_fp4",
            "bitsandbytes.functional:QuantState",
        ),
        "yes",
        "bytes and state-dict keys identical both ways",
    ),
    Feature(
        "code tables",
        (
            "bitsandbytes.functional:create_dynamic_map",
            "bitsandbytes.functional:create_normal_map",
            "bitsandbytes.functional:create_fp8_map",
            "bitsandbytes.functional:create_linear_map",
            "bitsandbytes.functional:get_4bit_type",
        ),
        "yes",
        "`get_4bit_type` defaults to a CPU tensor",
    ),
    Feature(
        "4-bit inference matmul",
        ("bitsandbytes.functional:gemv_4bit", "bitsandbytes:matmul_4bit"),
        "yes",
        "fused Triton gemv; QLoRA backward",
    ),
    Feature(
        "LLM.int8() ops and `matmul` with outlier threshold",
        (
            "bitsandbytes.functional:int8_vectorwise_quant",
            "bitsandbytes.functional:int8_double_quant",
            "bitsandbytes.functional:int8_linear_matmul",
            "bitsandbytes.functional:int8_mm_dequant",
            "bitsandbytes:matmul",
            "bitsandbytes:MatmulLtState",
        ),
        "yes",
        "`int8_mm_dequant` scales by exactly 1/127²",
    ),
    Feature(
        "4-bit layers (inference, QLoRA)",
        (
            "bitsandbytes.nn:Linear4bit",
            "bitsandbytes.nn:LinearNF4",
            "bitsandbytes.nn:LinearFP4",
            "bitsandbytes.nn:Params4bit",
            "bitsandbytes.nn:Embedding4bit",
            "bitsandbytes.nn:EmbeddingNF4",
            "bitsandbytes.nn:EmbeddingFP4",
        ),
        "yes",
        "checkpoints load across the libraries",
    ),
    Feature(
        "8-bit layers (LLM.int8() inference)",
        ("bitsandbytes.nn:Linear8bitLt", "bitsandbytes.nn:Int8Params", "bitsandbytes.nn:Embedding8bit"),
        "yes",
        "row-major `weight_format` only",
    ),
    Feature(
        "embeddings with 32-bit optimizer state",
        ("bitsandbytes.nn:StableEmbedding", "bitsandbytes.nn:Embedding"),
        "yes",
        "registered with `GlobalOptimManager`",
    ),
    Feature(
        "outlier tracing and `OutlierAwareLinear`",
        (
            "bitsandbytes.nn:OutlierAwareLinear",
            "bitsandbytes.utils:OutlierTracer",
            "bitsandbytes.utils:find_outlier_dims",
            "bitsandbytes.utils:outlier_hook",
        ),
        "yes",
        "`forward` returns the output (bitsandbytes returns None)",
    ),
    Feature(
        "8-bit and 32-bit optimizers",
        (
            "bitsandbytes.optim:Adam8bit",
            "bitsandbytes.optim:AdamW8bit",
            "bitsandbytes.optim:Lion8bit",
            "bitsandbytes.optim:SGD8bit",
            "bitsandbytes.optim:RMSprop8bit",
            "bitsandbytes.optim:Adagrad8bit",
            "bitsandbytes.optim:LAMB8bit",
            "bitsandbytes.optim:LARS8bit",
            "bitsandbytes.optim:AdEMAMix8bit",
            "bitsandbytes.optim:PytorchLARS",
        ),
        "yes",
        "state dicts load across the libraries; fused multi-tensor Triton updates",
    ),
    Feature(
        "paged optimizers",
        (
            "bitsandbytes.optim:PagedAdamW8bit",
            "bitsandbytes.optim:PagedAdam",
            "bitsandbytes.optim:PagedLion8bit",
            "bitsandbytes.optim:PagedAdEMAMix8bit",
        ),
        "yes",
        "state streams from pinned host memory, copies overlapped with the updates (no CUDA unified memory): 0.7x bitsandbytes' speed when the state would fit",
    ),
    Feature(
        "per-parameter optimizer overrides",
        ("bitsandbytes.optim:GlobalOptimManager",),
        "yes",
        "",
    ),
    Feature(
        "optimizer update functions",
        (
            "bitsandbytes.functional:optimizer_update_32bit",
            "bitsandbytes.functional:optimizer_update_8bit_blockwise",
        ),
        "yes",
        "",
    ),
    Feature(
        "model surgery and state-dict helpers",
        (
            "bitsandbytes.utils:replace_linear",
            "bitsandbytes.utils:pack_dict_to_tensor",
            "bitsandbytes.utils:unpack_tensor_to_dict",
            "bitsandbytes.utils:LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING",
        ),
        "yes",
        "",
    ),
    Feature(
        "diagnostics (`python -m bitsandbytes`)",
        (),
        "yes",
        "`python -m tritonbits`: facts from PyTorch only, plus a sanity run of every op family",
    ),
    Feature(
        "native-library access (ctypes, cuBLAS handles)",
        (
            "bitsandbytes.functional:lib",
            "bitsandbytes.functional:get_ptr",
            "bitsandbytes.functional:CUBLAS_Context",
            "bitsandbytes:cextension",
        ),
        "left out",
        "no compiled library: Triton kernels and PyTorch",
    ),
    Feature(
        "paged-memory tensor helpers",
        (
            "bitsandbytes.functional:GlobalPageManager",
            "bitsandbytes.functional:get_paged",
            "bitsandbytes.functional:prefetch_tensor",
            "bitsandbytes.functional:fill",
        ),
        "left out",
        "need CUDA unified memory through the C library",
    ),
    Feature(
        "deprecated int8 GEMMs",
        ("bitsandbytes.functional:igemm", "bitsandbytes.functional:batched_igemm"),
        "left out",
        "deprecated in bitsandbytes; `int8_linear_matmul` replaces them",
    ),
)


def public_names(module: types.ModuleType) -> dict[str, Any]:
    """The public names of a bitsandbytes (or tritonbits) module, name -> object.

    Public: not starting with ``_`` (plus :data:`EXTRA_PUBLIC`), and either a submodule of the
    same package, a class or function defined in the package (re-exports across its own modules
    count), or a value that is neither (dicts, sets, constants, a logger). Imported third-party
    names (``torch``, ``Optional``, ``Tensor``, ``np``, ``ct``...) are not.
    """
    package = module.__name__.split(".")[0]
    names = {}
    candidates = [n for n in dir(module) if not n.startswith("_")]
    candidates += [n for n in EXTRA_PUBLIC.get(module.__name__, ()) if hasattr(module, n)]
    for name in candidates:
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            if value.__name__.split(".")[0] == package:
                names[name] = value
            continue
        if inspect.isclass(value) or callable(value):
            defined_in = getattr(value, "__module__", None) or ""
            if defined_in.split(".")[0] == package:
                names[name] = value
            continue
        names[name] = value
    return names


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def signature_problems(reference: Any, candidate: Any) -> list[str]:
    """How ``candidate``'s call signature breaks :data:`SIGNATURE_RULE` against ``reference``.

    An empty list means every call valid for ``reference`` binds the same way to ``candidate``.
    Objects without an inspectable signature (builtins) must both lack one.
    """
    ref, cand = _signature(reference), _signature(candidate)
    if ref is None or cand is None:
        return [] if (ref is None) == (cand is None) else [f"signature only on one side: {ref} vs {cand}"]
    ref_params, cand_params = list(ref.parameters.values()), list(cand.parameters.values())
    problems = []
    for i, p in enumerate(ref_params):
        if i >= len(cand_params):
            problems.append(f"parameter {p.name!r} missing")
            continue
        q = cand_params[i]
        if q.name != p.name:
            problems.append(f"parameter {i} is {q.name!r}, bitsandbytes has {p.name!r}")
        elif q.kind != p.kind:
            problems.append(f"parameter {p.name!r} is {q.kind.description}, bitsandbytes has {p.kind.description}")
        elif not _same_default(p.default, q.default):
            problems.append(f"parameter {p.name!r} defaults to {q.default!r}, bitsandbytes to {p.default!r}")
    for q in cand_params[len(ref_params) :]:
        if q.kind is not inspect.Parameter.KEYWORD_ONLY or q.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {q.name!r} ({q.kind.description}) is not keyword-only with a default")
    return problems


def _same_default(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False
    try:
        return bool(a == b)
    except Exception:  # tensors and other objects without a plain truth value
        return repr(a) == repr(b)


def _features_rows() -> list[str]:
    rows = ["| bitsandbytes feature | in tritonbits | notes |", "|---|---|---|"]
    for f in FEATURES:
        names = ", ".join(f"`{n.split(':')[1]}`" for n in f.names)
        feature = f"{f.feature}: {names}" if names else f.feature
        rows.append(f"| {feature} | {f.status} | {f.note} |")
    return rows


README_START = "<!-- compat:start -->"
README_END = "<!-- compat:end -->"


def features_markdown() -> str:
    """The README block between :data:`README_START` and :data:`README_END` (markers included)."""
    left_out = sum(len(v) for v in LEFT_OUT.values())
    lines = [
        README_START,
        f"Checked against bitsandbytes {BITSANDBYTES_VERSION} by `tests/test_public_surface.py`: every public",
        "name of `bitsandbytes`, `.functional`, `.nn`, `.optim` and `.utils` exists in the matching tritonbits",
        "module with the same signature (parameter names, order, kinds, defaults; tritonbits may append",
        f"keyword-only parameters with defaults), except {left_out} names left out on purpose, each with its reason",
        "in `tritonbits/compat.py` (`LEFT_OUT`; deliberate behaviour differences in `DEVIATIONS`).",
        "",
        *_features_rows(),
        README_END,
    ]
    return "\n".join(lines)


def update_readme(path: str | Path) -> bool:
    """Rewrite the feature block of the README at ``path``; True if the file changed.

    The block must already exist (markers on their own lines): the rest of the README is not ours.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {README_START} ... {README_END} block to update")
    new = pattern.sub(lambda _: features_markdown(), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-readme"]:
        update_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        sys.stdout.write(features_markdown() + "\n")
