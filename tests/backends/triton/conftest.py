"""Run the Triton kernels on the GPU when there is one, else on CPU tensors through the interpreter.

``TRITON_INTERPRET`` must be set before Triton compiles (decorates) any kernel, so it is set here,
before the test modules import the kernel modules.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install tritonbits[triton])")


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU, or the CPU under TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def launcher():
    """``launcher(name)``: the Triton launcher of op ``name``, as the dispatcher would load it."""
    from tritonbits.backends.registry import load_triton_launcher

    return load_triton_launcher


@pytest.fixture
def reference():
    """``reference(name)``: the op's PyTorch reference implementation."""
    import tritonbits  # noqa: F401  (registers the references)
    from tritonbits._ops import REFERENCES

    return REFERENCES.__getitem__
