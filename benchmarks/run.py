"""The one benchmark entry point: ceilings, then the chosen groups, in one process on one device.

    python benchmarks/run.py                          # every group, full sizes, on the GPU
    python benchmarks/run.py --groups quant4,quant8   # some groups (ceilings always run first)
    python benchmarks/run.py --quick                  # tiny sizes; on a CPU-only machine this is
                                                      # what CI runs (wall clock, not GPU numbers)

Prints one line per case and implementation as it goes, writes
``<out>/<date>-<device>[-quick].{json,md,png}`` and prints a short table last. Peers that cannot
be imported, and tritonbits pieces not written yet, are reported "unavailable", never fatal.
Exit status: 0, or 1 with ``--strict`` when a tritonbits implementation failed with an error.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import groups as _groups  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.harness import Context, run_case  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--groups", default=",".join(_groups.ORDER), help=f"comma-separated, from {','.join(_groups.ORDER)}"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short timings (CI, smoke runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results (default %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--filter", default="", help="only cases whose id contains this text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per implementation")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a tritonbits implementation errored")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.groups.split(",") if n.strip()]
    try:
        selected = _groups.load(names)
    except ValueError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    quick = args.quick
    rep_ms = args.rep_ms if args.rep_ms is not None else (10.0 if quick else 200.0)
    ctx = Context(
        device=device,
        quick=quick,
        seed=args.seed,
        rep_ms=rep_ms,
        warmup_ms=min(25.0, rep_ms / 4),
        min_reps=3 if quick else 10,
    )

    env = report.environment(ctx)
    print(f"{env['device']['name']} | {env['versions']} | timing: {env['device']['timing']}", flush=True)

    records: list[dict] = []
    started = datetime.datetime.now(datetime.timezone.utc)
    group_names = [n for n, _ in selected]
    for name, make_cases in selected:
        cases = make_cases(ctx)
        if name != "ceilings" and args.filter:
            cases = [c for c in cases if args.filter in c.id]
        for case in cases:
            records.append(run_case(case, ctx, log=lambda line: print(line, flush=True)))
            # Rewritten after every case: a run cut short (time limit, crash) keeps what it measured.
            report.write_json(report.document(records, ctx, group_names, started, complete=False), args.out)

    doc = report.document(records, ctx, group_names, started)
    written = report.write_all(doc, args.out, chart=not args.no_chart)
    for key in ("json", "md", "png"):
        if key in written:
            print(f"wrote {written[key]}")
    if "chart_note" in written:
        print(written["chart_note"])
    print()
    print(report.render_console(doc), flush=True)

    failed = [
        c["id"] for c in records if c.get("results", {}).get("tritonbits", {}).get("status", "").startswith("error")
    ]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
