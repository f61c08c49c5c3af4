"""Autograd functions: ``matmul_4bit`` (frozen 4-bit weight, QLoRA)."""

from .matmul_4bit import MatMul4Bit, matmul_4bit  # noqa: F401
from .matmul_8bit import MatmulLtState, matmul  # noqa: F401
