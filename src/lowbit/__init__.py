"""lowbit: post-training compression of Hugging Face causal LMs, measured on real weights."""

__version__ = "0.1.0"

from lowbit.api import load, quantize, save  # noqa: E402
from lowbit.recipe import (  # noqa: E402
    AWQ,
    GPTQ,
    RTN,
    ActQuant,
    LLMInt8,
    Prune,
    Recipe,
    SmoothQuant,
    SparseGPT,
    WeightQuant,
)

__all__ = [
    "AWQ", "GPTQ", "RTN", "ActQuant", "LLMInt8", "Prune", "Recipe", "SmoothQuant", "SparseGPT", "WeightQuant",
    "load", "quantize", "save", "__version__",
]
