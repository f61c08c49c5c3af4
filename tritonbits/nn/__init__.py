"""Quantized layers, name for name as ``bitsandbytes.nn``."""

from .embedding4bit import Embedding4bit, EmbeddingFP4, EmbeddingNF4  # noqa: F401
from .linear4bit import Linear4bit, LinearFP4, LinearNF4  # noqa: F401
from .params4bit import Params4bit  # noqa: F401
from .linear8bit import Int8Params, Linear8bitLt  # noqa: F401
from .embedding8bit import Embedding8bit  # noqa: F401
from .embedding import Embedding, StableEmbedding  # noqa: F401
from .outlier import OutlierAwareLinear  # noqa: F401
