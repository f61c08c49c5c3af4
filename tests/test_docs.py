"""The documentation builds (``python docs/build.py``) and its checks catch what they claim to."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "docs" / "build.py"


def _load_build():
    spec = importlib.util.spec_from_file_location("docs_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_passes():
    """The one command CI runs: links, names and the pdoc API reference (about 15 s on 2 cores)."""
    args = [] if importlib.util.find_spec("pdoc") else ["--no-api"]
    result = subprocess.run(
        [sys.executable, str(BUILD), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "docs OK" in result.stdout
    if not args:
        for module in ("tritonbits", "tritonbits/functional", "tritonbits/nn", "tritonbits/optim", "tritonbits/utils"):
            assert (ROOT / "docs" / "_build" / "api" / f"{module}.html").exists(), module


def test_guide_pages_exist():
    names = {p.stem for p in (ROOT / "docs").glob("*.md")}
    expected = {"index", "inference-4bit-8bit", "qlora", "optimizers", "migrating-from-bitsandbytes", "diagnostics",
                "performance"}
    assert expected <= names


def test_broken_links_and_names_are_caught(tmp_path, monkeypatch):
    build = _load_build()
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## Some Section: `x`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok anchor](other.md#some-section-x) [self](#title) [web](https://example.com)\n"
        "[missing](nowhere.md) [bad anchor](other.md#nope) ![img](gone.png)\n"
        "# Title\n`tritonbits.nn.Linear4bit` `tritonbits.functional.quantize_4bit` `tritonbits.nn.NoSuchLayer`\n"
        "```\n[inside a code block](ignored.md)\n```\n",
        encoding="utf-8",
    )
    problems = build.check_links([page])
    assert len(problems) == 3, problems
    assert any("nowhere.md does not exist" in p for p in problems)
    assert any("no heading #nope" in p for p in problems)
    assert any("gone.png does not exist" in p for p in problems)
    names = build.check_names([page])
    assert names == ["page.md: `tritonbits.nn.NoSuchLayer` does not resolve"]


def test_github_anchors():
    build = _load_build()
    assert build.github_anchor("Moving from bitsandbytes") == "moving-from-bitsandbytes"
    assert build.github_anchor("4-bit: `tritonbits.nn.Linear4bit`") == "4-bit-tritonbitsnnlinear4bit"
    assert build.github_anchor("Paged optimizers") == "paged-optimizers"
