"""``python -m tritonbits``: what this machine has, whether each op works on it, and what to fix.

- ``report.py``: facts (platform, Python, PyTorch, GPUs, Triton, packages, environment) and
  findings (problems with plain-language hints), asked of PyTorch and package metadata only.
- ``checks.py``: sanity runs of each op family on every device against float64 math, and a
  tiny Triton kernel compiled on each GPU.
- ``cli.py``: the text and JSON output, the verdict and the exit code.

Nothing here runs at ``import tritonbits``; this package is imported on first use.
"""

from .cli import main, run_diagnostics

__all__ = ["main", "run_diagnostics"]
