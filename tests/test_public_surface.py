"""Every public name of bitsandbytes exists in tritonbits with the same signature, or is left out on purpose.

Walks ``bitsandbytes``, ``.functional``, ``.nn``, ``.optim`` and ``.utils`` (the installed
0.50.2), using ``tritonbits.compat.public_names`` for what "public" means. Each test collects every
problem of its module before failing, so one run lists them all. The table tests keep
``tritonbits/compat.py`` and the README feature table honest without bitsandbytes too.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

import pytest

import tritonbits
from tritonbits import compat

ROOT = Path(__file__).resolve().parent.parent


def _import_bitsandbytes(module_name: str):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: nothing to compare against")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


def _own_methods(cls: type) -> dict[str, object]:
    """Public methods (and ``__init__``) defined in ``cls`` itself, as attributes of the class."""
    methods = {}
    for name, raw in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
            methods[name] = getattr(cls, name)
    return methods


def _own_properties(cls: type) -> list[str]:
    return [name for name, raw in vars(cls).items() if not name.startswith("_") and isinstance(raw, property)]


def test_bitsandbytes_version_is_the_one_mirrored():
    bnb = _import_bitsandbytes("bitsandbytes")
    assert bnb.__version__ == compat.BITSANDBYTES_VERSION


@pytest.mark.parametrize("bnb_name", sorted(compat.MODULES))
def test_every_public_name_exists_or_is_left_out(bnb_name):
    bnb_module = _import_bitsandbytes(bnb_name)
    ours = importlib.import_module(compat.MODULES[bnb_name])
    left_out = compat.LEFT_OUT[bnb_name]
    missing = [
        name for name in compat.public_names(bnb_module) if name not in left_out and not hasattr(ours, name)
    ]
    assert not missing, f"{compat.MODULES[bnb_name]} lacks {missing}: provide them or list them in compat.LEFT_OUT"


@pytest.mark.parametrize("bnb_name", sorted(compat.MODULES))
def test_signatures_match(bnb_name):
    bnb_module = _import_bitsandbytes(bnb_name)
    ours = importlib.import_module(compat.MODULES[bnb_name])
    problems = []
    for name, theirs in sorted(compat.public_names(bnb_module).items()):
        if not callable(theirs) or inspect.ismodule(theirs) or name in compat.LEFT_OUT[bnb_name]:
            continue
        mine = getattr(ours, name, None)
        if mine is None:
            continue  # reported by test_every_public_name_exists_or_is_left_out
        problems += [f"{name}: {p}" for p in compat.signature_problems(theirs, mine)]
        if not inspect.isclass(theirs):
            continue
        for method, their_method in _own_methods(theirs).items():
            if not hasattr(mine, method):
                problems.append(f"{name}.{method}: missing")
                continue
            found = compat.signature_problems(their_method, getattr(mine, method))
            problems += [f"{name}.{method}: {p}" for p in found]
        problems += [f"{name}.{prop}: property missing" for prop in _own_properties(theirs) if not hasattr(mine, prop)]
    assert not problems, "signature mismatches:\n" + "\n".join(problems)


@pytest.mark.parametrize("bnb_name", sorted(compat.MODULES))
def test_public_values_match(bnb_name):
    """Dicts and sets (format mappings, feature flags) hold the same items."""
    bnb_module = _import_bitsandbytes(bnb_name)
    ours = importlib.import_module(compat.MODULES[bnb_name])
    differing = [
        name
        for name, theirs in compat.public_names(bnb_module).items()
        if isinstance(theirs, (dict, set, frozenset))
        and name not in compat.LEFT_OUT[bnb_name]
        and getattr(ours, name, None) != theirs
    ]
    assert not differing, f"values differ from bitsandbytes: {differing}"


@pytest.mark.parametrize("bnb_name", sorted(compat.MODULES))
def test_left_out_names_exist_in_bitsandbytes_and_not_here(bnb_name):
    """A left-out entry for a name bitsandbytes dropped, or one tritonbits now has, is stale."""
    bnb_module = _import_bitsandbytes(bnb_name)
    ours = importlib.import_module(compat.MODULES[bnb_name])
    public = compat.public_names(bnb_module)
    stale = [name for name in compat.LEFT_OUT[bnb_name] if name not in public]
    provided = [name for name in compat.LEFT_OUT[bnb_name] if hasattr(ours, name)]
    assert not stale, f"left out but not public in {bnb_name}: {stale}"
    assert not provided, f"left out but provided by {compat.MODULES[bnb_name]}: {provided}"


def test_deviations_name_real_bitsandbytes_objects():
    problems = []
    for dotted in compat.DEVIATIONS:
        module_name = max((m for m in compat.MODULES if dotted == m or dotted.startswith(m + ".")), key=len)
        obj = _import_bitsandbytes(module_name)
        for part in dotted[len(module_name) :].split(".")[1:]:
            obj = getattr(obj, part, None)
        if obj is None:
            problems.append(dotted)
    assert not problems, f"DEVIATIONS entries that bitsandbytes does not have: {problems}"


def test_left_out_table_is_well_formed():
    assert set(compat.LEFT_OUT) == set(compat.MODULES)
    for module_name, entries in compat.LEFT_OUT.items():
        for name, reason in entries.items():
            assert reason.strip() and "\n" not in reason, f"{module_name}.{name}: reason must be one line"


def test_requested_names_are_provided():
    """The names the public-surface issue asked for by name, checked without bitsandbytes too."""
    import tritonbits.nn as nn
    import tritonbits.utils as utils

    for module, names in [
        (tritonbits, ["matmul", "matmul_4bit", "MatmulLtState", "__version__", "features", "supported_torch_devices"]),
        (nn, ["StableEmbedding", "Embedding", "OutlierAwareLinear"]),
        (utils, ["replace_linear", "OutlierTracer", "find_outlier_dims", "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING"]),
    ]:
        assert [n for n in names if not hasattr(module, n)] == []


@pytest.mark.parametrize("feature", compat.FEATURES, ids=lambda f: f.feature[:40])
def test_feature_table_rows_are_true(feature):
    assert feature.status in ("yes", "left out")
    for qualified in feature.names:
        module_name, name = qualified.split(":")
        assert module_name in compat.MODULES, qualified
        if feature.status == "yes":
            assert name not in compat.LEFT_OUT[module_name], f"{qualified} is marked left out"
            assert hasattr(importlib.import_module(compat.MODULES[module_name]), name), f"{qualified} is missing"
        else:
            assert name in compat.LEFT_OUT[module_name], f"{qualified} is not in compat.LEFT_OUT"


def test_readme_feature_table_matches_compat():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(compat.README_START) + r".*?" + re.escape(compat.README_END), readme, re.DOTALL)
    assert block is not None, "README.md has no feature table block; run python -m tritonbits.compat --write-readme"
    stale = "README feature table is stale: run python -m tritonbits.compat --write-readme"
    assert block.group(0) == compat.features_markdown(), stale


def test_signature_rule_catches_each_kind_of_difference():
    """The comparison itself: renamed, reordered, re-defaulted, re-kinded and extra parameters."""

    def reference(a, b=1, *, c=None):
        pass

    def same(a, b=1, *, c=None, extension=True):
        pass

    def renamed(a, bb=1, *, c=None):
        pass

    def reordered(b=1, a=None, *, c=None):
        pass

    def redefaulted(a, b=2, *, c=None):
        pass

    def rekinded(a, b=1, c=None):
        pass

    def extra_positional(a, b=1, *, c=None, d):
        pass

    assert compat.signature_problems(reference, same) == []
    for candidate in (renamed, reordered, redefaulted, rekinded, extra_positional):
        assert compat.signature_problems(reference, candidate), candidate.__name__
