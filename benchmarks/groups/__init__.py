"""Benchmark groups: each module registers one function ``cases(ctx) -> list[Case]``.

Adding a group is one module here with::

    @register("name")
    def cases(ctx: Context) -> list[Case]:
        ...

plus its name in ``ORDER``. ``ceilings`` always runs first: every fraction is taken of what it
measured in the same process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

ORDER = ("ceilings", "quant4", "quant8", "lin4", "lin8", "optim")

GROUPS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: make ``fn(ctx) -> list[Case]`` the case list of group ``name``."""

    def decorate(fn):
        GROUPS[name] = fn
        return fn

    return decorate


def load(names: Sequence[str]) -> list[tuple[str, Callable]]:
    """The case functions of ``names`` (in ORDER, ``ceilings`` first and always included)."""
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; choose from {', '.join(ORDER)}")
    wanted = {"ceilings", *names}
    selected = []
    for name in ORDER:
        if name in wanted:
            importlib.import_module(f"{__name__}.{name}")
            selected.append((name, GROUPS[name]))
    return selected
