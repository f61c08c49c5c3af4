"""``python -m tritonbits`` (or the ``tritonbits`` script): environment report and sanity checks.

See ``tritonbits/diagnostics``. Only the standard library is imported at module level, so that
even a broken install answers with a report rather than a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Run the diagnostics; returns the exit code (0: every check passed, 1: something failed)."""
    try:
        from tritonbits.diagnostics.cli import main as run
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - never a traceback, even if tritonbits cannot import
        print(f"tritonbits diagnostics could not start: {type(error).__name__}: {error}")
        print("hint: reinstall tritonbits and PyTorch; please report this with the output of `pip list`.")
        return 1
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
