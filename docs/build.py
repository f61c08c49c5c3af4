"""Build the documentation and fail on any broken reference: ``python docs/build.py``.

1. Links: every ``[text](target)`` and ``![alt](target)`` in ``docs/*.md`` whose target is
   relative must name an existing file (relative to the page) and, with ``#anchor``, a heading
   of that Markdown file (GitHub's anchor rules).
2. Names: every backticked dotted name starting with ``tritonbits.`` (``tritonbits.nn.Linear4bit``)
   must import or resolve as an attribute, so renamed APIs cannot linger in the guide.
3. API reference: pdoc renders every public module of the package (no path component starting
   with ``_``) to ``docs/_build/api``; an import error or a warning from pdoc fails the build.
   Modules that need an optional dependency which is not installed (transformers for
   ``tritonbits.hf.config``...) are skipped and listed.

Exit status 0 when all is well, 1 with one line per problem otherwise. ``--no-api`` runs steps 1
and 2 only (no pdoc needed).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shutil
import re
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUTPUT = DOCS / "_build" / "api"

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_NAME = re.compile(r"`(tritonbits(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    found, seen = set(), {}
    text = _FENCE.sub("", markdown.read_text(encoding="utf-8"))
    for line in text.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def check_links(pages: list[Path]) -> list[str]:
    problems = []
    for page in pages:
        text = _FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            target_path = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}: [{target}]"
            if not target_path.exists():
                problems.append(f"{where}: {path_part} does not exist")
            elif anchor and target_path.suffix == ".md" and anchor not in anchors(target_path):
                problems.append(f"{where}: no heading #{anchor} in {target_path.relative_to(ROOT)}")
    return problems


def resolve(dotted: str) -> bool:
    """True if ``dotted`` is an importable module or an attribute reachable from one."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            try:
                obj = getattr(obj, attribute)
            except AttributeError:
                return False
        return True
    return False


def check_names(pages: list[Path]) -> list[str]:
    problems = []
    for page in pages:
        for dotted in sorted(set(_NAME.findall(page.read_text(encoding="utf-8")))):
            if not resolve(dotted):
                problems.append(f"{page.relative_to(ROOT)}: `{dotted}` does not resolve")
    return problems


def public_modules() -> tuple[list[str], list[str]]:
    """(public module names that import, notes about those skipped for a missing optional dependency)."""
    import tritonbits

    names, skipped = ["tritonbits"], []
    for info in pkgutil.walk_packages(tritonbits.__path__, "tritonbits."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as error:
            if error.name and not error.name.startswith("tritonbits"):
                skipped.append(f"{info.name} (needs {error.name})")
                continue
            raise
        parent_name, _, short = info.name.rpartition(".")
        parent_all = getattr(sys.modules[parent_name], "__all__", None)
        if parent_all is not None and short not in parent_all:
            # A package with __all__ exports names, not this module: it is an implementation
            # detail (e.g. tritonbits.hf.quantizer behind tritonbits.hf), and pdoc gives it no page.
            continue
        names.append(info.name)
    for name in names:
        _materialize_lazy_exports(sys.modules[name])
    return names, skipped


def _materialize_lazy_exports(module) -> None:
    """Bind names of ``__all__`` served by a module ``__getattr__``, so that pdoc finds them.

    pdoc looks an ``__all__`` entry up in the module's namespace and otherwise tries to import it
    as a submodule, which reports lazily served names (``tritonbits.hf.TritonBitsConfig``) as broken.
    """
    for name in getattr(module, "__all__", ()):
        if name not in vars(module):
            setattr(module, name, getattr(module, name))


def build_api() -> list[str]:
    import pdoc
    import pdoc.render

    modules, skipped = public_modules()
    for note in skipped:
        sys.stderr.write(f"skipped: {note}\n")
    pdoc.render.configure(docformat="google", footer_text="tritonbits")
    # A fresh folder: pages left by an earlier build must not pass the "page written" check below.
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    excluded = [f"!{note.split()[0]}" for note in skipped]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("tritonbits", *excluded, output_directory=OUTPUT)  # the package brings its submodules
    problems = []
    for w in caught:
        message = str(w.message)
        if "pdoc" not in (w.filename or ""):
            continue
        if any(text in message for text in _COSMETIC):
            sys.stderr.write(f"note: {message}\n")
        else:
            problems.append(f"pdoc: {message}")
    pages = [m for m in modules if not (OUTPUT / (m.replace(".", "/") + ".html")).exists()]
    problems += [f"pdoc wrote no page for {m}" for m in pages]
    return problems


# pdoc warnings that leave the page complete and correct apart from how an annotation or an
# inherited attribute is displayed; everything else (unresolvable names, import errors) fails.
_COSMETIC = ("Error parsing type annotation", "Cannot determine where")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-api", action="store_true", help="check links and names only, skip pdoc")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    pages = sorted(DOCS.glob("*.md"))
    if not pages:
        sys.stderr.write("no docs/*.md pages found\n")
        return 1
    problems = check_links(pages) + check_names(pages)
    if not args.no_api:
        problems += build_api()
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if not problems:
        where = "" if args.no_api else f"; API reference in {OUTPUT.relative_to(ROOT)}/index.html"
        sys.stdout.write(f"docs OK: {len(pages)} pages checked{where}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
