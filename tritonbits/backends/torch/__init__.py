"""Pure-PyTorch reference implementations, registered for every device on import."""

from . import int8, optim, quant_4bit, quant_blockwise  # noqa: F401  (imported for registration)
