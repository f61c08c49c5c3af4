"""8-bit and 32-bit optimizers, name for name and argument for argument as ``bitsandbytes.optim``.

The update rules are the ops ``tritonbits::optimizer_update_32bit`` and
``tritonbits::optimizer_update_8bit_blockwise`` (PyTorch reference in
``backends/torch/optim.py``); state layout, paging and overrides are in ``optimizer.py``.
"""

from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from .adam import (
    Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit,
    PagedAdamW, PagedAdamW8bit, PagedAdamW32bit,
)  # fmt: skip
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lars import LARS, LARS8bit, LARS32bit, PytorchLARS
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .optimizer import GlobalOptimManager, Optimizer1State, Optimizer2State, Optimizer8bit
from .rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD8bit, SGD32bit
