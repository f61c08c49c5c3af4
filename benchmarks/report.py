"""Results: the JSON document, the markdown table, the PNG chart.

One run writes three files with one stem under ``benchmarks/results/``:
``<UTC date>-<device>[-quick].json`` (everything measured), ``.md`` (the table) and ``.png``
(fraction of the ceiling per case, tritonbits vs bitsandbytes). The chart needs matplotlib; where
it is missing (the GPU machine may lack it) the run says so and the chart can be drawn later from
the JSON anywhere::

    python benchmarks/report.py benchmarks/results/<stem>.json      # rewrites .md and .png

JSON layout (``schema`` 1)::

    {"schema": 1, "date": ISO-8601 UTC (start of the run), "complete": bool, "quick": bool,
     "groups": [...],
     "device": {"type", "name", "timing", "cache_bytes"},
     "versions": {"python", "torch", "cuda", "triton", "bitsandbytes", "tritonbits", "backend"},
     "ceilings": {"copy_GBps", "matmul_TFLOPs", "int8_mm_TOPs"},
     "cases": [{"id", "group", "title", "bytes", "flops", "limit", "target", "info",
                "bnb_over_ours", "torch_over_ours",
                "results": {"tritonbits" | "bitsandbytes" | "torch":
                            {"status", "ms", "ms_p20", "ms_p80", "GBps", "frac_copy", "TFLOPs",
                             "frac_matmul", "rel_err", ...}}}]}

``status`` is "ok", "unavailable: <reason>" or "error: <reason>"; times in ms, GB/s = 1e9 B/s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Context, frac_of_limit, version_of  # noqa: E402

SCHEMA = 1
CPU_NOTE = "CPU wall-clock run: it checks the code path only; these are not GPU numbers."


def environment(ctx: Context) -> dict:
    """Device, timing method and versions of everything measured."""
    import torch

    if ctx.is_cuda:
        name = torch.cuda.get_device_name(ctx.device)
        timing = "CUDA events around each call, median"
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        timing = "time.perf_counter around each call, median (" + CPU_NOTE + ")"
    backend = None
    try:
        from tritonbits.backends.registry import selected_backend

        backend = selected_backend()
    except Exception:  # tritonbits itself broken: the run still reports the peers
        pass
    return {
        "device": {"type": ctx.device.type, "name": name, "timing": timing, "cache_bytes": ctx.cache_bytes},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": version_of("triton"),
            "bitsandbytes": version_of("bitsandbytes"),
            "tritonbits": version_of("tritonbits"),
            "backend": backend,
        },
    }


def document(
    records: list[dict],
    ctx: Context,
    groups: list[str],
    date: Optional[_dt.datetime] = None,
    complete: bool = True,
) -> dict:
    """The results document; ``complete=False`` marks a partial one written while the run goes on."""
    date = date or _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "date": date.isoformat(timespec="seconds"),
        "complete": complete,
        "quick": ctx.quick,
        "groups": groups,
        **environment(ctx),
        "ceilings": dict(ctx.ceilings),
        "cases": records,
    }


def stem(doc: dict) -> str:
    """File stem: ``20261122-101500-nvidia-h100-80gb-hbm3`` (+ ``-quick``)."""
    date = _dt.datetime.fromisoformat(doc["date"]).strftime("%Y%m%d-%H%M%S")
    device = re.sub(r"[^a-z0-9]+", "-", doc["device"]["name"].lower()).strip("-")[:40]
    if doc["device"]["type"] == "cpu":
        device = "cpu"
    return f"{date}-{device}" + ("-quick" if doc["quick"] else "")


def write_json(doc: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem(doc)}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# markdown


def _ms(result: dict) -> str:
    status = result.get("status", "")
    if status == "ok":
        return f"{result['ms']:.4g}"
    if status.startswith("unavailable"):
        return "n/a"
    return "err" if status else ""


def _pct(value: Optional[float]) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"


def _floor(case: dict, judged: bool = True) -> str:
    """">=80% met" / ">=80% MISS"; just ">=80%" where not judged (floors hold for full GPU runs)."""
    target = case.get("target")
    if target is None:
        return ""
    reached = frac_of_limit(case, "tritonbits")
    if reached is None or not judged:
        return f">={100 * target:.0f}%"
    return f">={100 * target:.0f}% " + ("met" if reached >= target else "MISS")


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def _judged(doc: dict) -> bool:
    return doc["device"]["type"] == "cuda" and not doc.get("quick")


def header_lines(doc: dict) -> list[str]:
    v, c = doc["versions"], doc["ceilings"]
    lines = [
        f"{doc['device']['name']}, {doc['date']}; torch {v['torch']}, triton {v['triton']}, "
        f"bitsandbytes {v['bitsandbytes'] or 'missing'}, tritonbits {v['tritonbits']} "
        f"(TRITONBITS_BACKEND={v.get('backend')}); timing: {doc['device']['timing']}.",
    ]
    parts = []
    if c.get("copy_GBps"):
        parts.append(f"copy {c['copy_GBps']:.0f} GB/s (read+write)")
    if c.get("matmul_TFLOPs"):
        parts.append(f"bf16 matmul {c['matmul_TFLOPs']:.3g} TFLOP/s")
    if c.get("int8_mm_TOPs"):
        parts.append(f"int8 _int_mm {c['int8_mm_TOPs']:.3g} TOP/s")
    lines.append("Ceilings measured in the same process: " + (", ".join(parts) or "none") + ".")
    if doc["device"]["type"] == "cpu":
        lines.append(f"**{CPU_NOTE}**")
    if not doc.get("complete", True):
        lines.append("**Partial run: it stopped before every case was measured.**")
    return lines


def render_markdown(doc: dict, chart: Optional[str] = None) -> str:
    """The results table: one row per case; ratios are bitsandbytes ms / tritonbits ms (>1: ours faster)."""
    lines = header_lines(doc) + [""]
    lines.append(
        "| case | ours ms | bnb ms | torch ms | bnb/ours | ours % limit | bnb % limit | floor | ours rel_err "
        "| ours via |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    notes: dict[str, None] = {}
    for case in doc["cases"]:
        if case["group"] == "ceilings":
            continue
        results = case.get("results", {})
        ours, bnb, ref = (results.get(k, {}) for k in ("tritonbits", "bitsandbytes", "torch"))
        limit = "mm" if case.get("limit") == "matmul" else "copy"
        ours_pct, bnb_pct = _pct(frac_of_limit(case, "tritonbits")), _pct(frac_of_limit(case, "bitsandbytes"))
        rel = ours.get("rel_err")
        lines.append(
            f"| {case['id']} | {_ms(ours)} | {_ms(bnb)} | {_ms(ref)} | {_ratio(case.get('bnb_over_ours'))} "
            f"| {ours_pct + ' ' + limit if ours_pct else ''} | {bnb_pct + ' ' + limit if bnb_pct else ''} "
            f"| {_floor(case, _judged(doc))} | {'' if rel is None else f'{rel:.3g}'} | {ours.get('backend') or ''} |"
        )
        for name, result in results.items():
            status = result.get("status", "")
            if status and status != "ok":
                notes[f"{name}: {status}"] = None
        if case.get("status"):
            notes[f"{case['id']}: {case['status']}"] = None
    lines += graph_table(doc)
    if notes:
        lines += ["", "Not measured (n/a, err):"] + [f"- {note}" for note in list(notes)[:12]]
        if len(notes) > 12:
            lines.append(f"- ... {len(notes) - 12} more in the JSON")
    if chart:
        lines += ["", f"![fraction of the ceiling per case]({chart})"]
    return "\n".join(lines) + "\n"


def _graph_ms(result: dict) -> str:
    if result.get("graph_ms"):
        return f"{result['graph_ms']:.4g}"
    status = result.get("graph_status", "")
    return "n/c" if status.startswith("not capturable") else ("err" if status else "")


def graph_table(doc: dict) -> list[str]:
    """Markdown lines of the cases also timed from a CUDA graph (none: no lines)."""
    cases = [c for c in doc["cases"] if any("graph_ms" in r or "graph_status" in r for r in c.get("results", {}).values())]
    if not cases:
        return []
    copy = doc["ceilings"].get("copy_GBps")
    lines = [
        "",
        "The decode sizes again, replayed from a CUDA graph (kernel time, host taken out, as in a decode step "
        "captured by `torch.compile(mode=\"reduce-overhead\")`; n/c: the call cannot be captured):",
        "",
        "| case | ours ms | bnb ms | torch ms | bnb/ours | torch/ours | ours % copy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        results = case["results"]
        ours, bnb, ref = (results.get(k, {}) for k in ("tritonbits", "bitsandbytes", "torch"))
        moved = ours.get("bytes") or case.get("bytes")
        pct = _pct(moved / (ours["graph_ms"] * 1e6) / copy) if moved and copy and ours.get("graph_ms") else ""
        lines.append(
            f"| {case['id']} | {_graph_ms(ours)} | {_graph_ms(bnb)} | {_graph_ms(ref)} "
            f"| {_ratio(case.get('bnb_over_ours_graph'))} | {_ratio(case.get('torch_over_ours_graph'))} | {pct} |"
        )
    return lines


def render_console(doc: dict) -> str:
    """A short fixed-width table for the end of the log (the device tool returns only the tail)."""
    lines = header_lines(doc)
    lines.append(f"{'case':<50} {'ours ms':>9} {'bnb ms':>9} {'bnb/ours':>8} {'ours%':>6} {'bnb%':>6}  floor")
    for case in doc["cases"]:
        if case["group"] == "ceilings":
            continue
        results = case.get("results", {})
        ours, bnb = results.get("tritonbits", {}), results.get("bitsandbytes", {})
        ours_pct, bnb_pct = _pct(frac_of_limit(case, "tritonbits")), _pct(frac_of_limit(case, "bitsandbytes"))
        lines.append(
            f"{case['id'][:50]:<50} {_ms(ours):>9} {_ms(bnb):>9} {_ratio(case.get('bnb_over_ours')):>8} "
            f"{ours_pct:>6} {bnb_pct:>6}  {_floor(case, _judged(doc))}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# chart


def make_chart(doc: dict, path: Path) -> Optional[str]:
    """Horizontal bars: % of its limit per case, tritonbits vs bitsandbytes, floors as ticks.

    Returns None when the chart was written, else the reason it was not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"chart skipped: matplotlib not importable ({error})"
    cases = [c for c in doc["cases"] if c["group"] != "ceilings"]
    rows = [(c, frac_of_limit(c, "tritonbits"), frac_of_limit(c, "bitsandbytes")) for c in cases]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    height = 0.3 * max(len(rows), 1) + 1.5
    fig, ax = plt.subplots(figsize=(11, height))
    bar = 0.38
    for i, (case, ours, bnb) in enumerate(rows):
        y = len(rows) - 1 - i
        ax.barh(y + bar / 2, 100 * (ours or 0), bar, color="#1f77b4", label="tritonbits" if i == 0 else None)
        ax.barh(y - bar / 2, 100 * (bnb or 0), bar, color="#ff7f0e", label="bitsandbytes" if i == 0 else None)
        if case.get("target"):
            ax.plot([100 * case["target"]] * 2, [y - 0.45, y + 0.45], color="black", lw=1.5,
                    label="floor" if not any(r[0].get("target") for r in rows[:i]) else None)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{c['id']} ({'mm' if c.get('limit') == 'matmul' else 'copy'})" for c, _, _ in rows][::-1],
                       fontsize=7)
    ax.set_xlabel("% of the measured ceiling (copy bandwidth, or bf16 matmul rate for 'mm')")
    title = f"{doc['device']['name']} - {doc['date'][:10]}"
    if doc["device"]["type"] == "cpu":
        title += " - CPU wall clock, not GPU numbers"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(doc: dict, out_dir: Path, chart: bool = True) -> dict:
    """Write the JSON, the chart (if asked and possible) and the markdown; returns their paths."""
    json_path = write_json(doc, out_dir)
    png_path = json_path.with_suffix(".png")
    written = {"json": json_path}
    note = make_chart(doc, png_path) if chart else "chart not asked for"
    if note is None:
        written["png"] = png_path
    else:
        written["chart_note"] = note
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render_markdown(doc, png_path.name if "png" in written else None))
    written["md"] = md_path
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Re-render the table and chart of a results JSON.")
    parser.add_argument("results", type=Path, help="a benchmarks/results/*.json file")
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    png = args.results.with_suffix(".png")
    note = make_chart(doc, png)
    args.results.with_suffix(".md").write_text(render_markdown(doc, png.name if note is None else None))
    print(note or f"wrote {png}")
    print(f"wrote {args.results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
