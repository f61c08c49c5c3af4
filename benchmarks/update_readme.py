"""Put the latest results table and chart into the READMEs, between the bench markers.

    python benchmarks/update_readme.py                       # newest GPU (not --quick) results
    python benchmarks/update_readme.py --results benchmarks/results/<stem>.json --readme README.md

Replaces everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` (the markers
stay) in each README given (default: the repository's README.md and benchmarks/README.md). A
README without the markers is left alone and named in the output; if none had them, exit 1.
The chart link is relative to each README and appears only if the PNG exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between the markers replaced by ``block``; ValueError if no markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"expected {START} ... {END} in this order")
    return text[: start + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def latest_results(folder: Path) -> Path:
    """The newest results JSON in ``folder``, preferring full GPU runs, then complete ones."""
    found = []
    for path in folder.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        full_gpu = doc.get("device", {}).get("type") == "cuda" and not doc.get("quick")
        found.append((full_gpu, doc.get("complete", True), doc.get("date", ""), path))
    if not found:
        raise FileNotFoundError(f"no results JSON in {folder}; run benchmarks/run.py first")
    return max(found)[-1]


def block_for(doc: dict, results: Path, readme: Path) -> str:
    png = results.with_suffix(".png")
    chart = Path(os.path.relpath(png, readme.parent)).as_posix() if png.exists() else None
    source = Path(os.path.relpath(results, readme.parent)).as_posix()
    return report.render_markdown(doc, chart) + f"\nFull results: [{results.name}]({source}).\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default: newest in results/)")
    parser.add_argument("--readme", type=Path, action="append", default=None, help="README to update (repeatable)")
    args = parser.parse_args(argv)
    try:
        results = args.results or latest_results(RESULTS)
    except FileNotFoundError as error:
        print(f"update_readme.py: {error}", file=sys.stderr)
        return 1
    doc = json.loads(results.read_text())
    readmes = args.readme or [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    updated = 0
    for readme in readmes:
        if not readme.exists():
            print(f"skipped {readme}: no such file")
            continue
        try:
            readme.write_text(replace_block(readme.read_text(), block_for(doc, results.resolve(), readme.resolve())))
        except ValueError as error:
            print(f"skipped {readme}: {error}")
            continue
        updated += 1
        print(f"updated {readme} from {results}")
    return 0 if updated else 1


if __name__ == "__main__":
    raise SystemExit(main())
