"""lowbit: post-training compression of Hugging Face causal LMs, measured on real weights.

The public names below are imported on first use (PEP 562), so ``import lowbit`` (and the ``lowbit`` command's
``--help`` and argument errors) does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "lowbit.api",
    "quantize": "lowbit.api",
    "save": "lowbit.api",
    "AWQ": "lowbit.recipe",
    "AutoRound": "lowbit.recipe",
    "GPTQ": "lowbit.recipe",
    "RTN": "lowbit.recipe",
    "ActQuant": "lowbit.recipe",
    "LLMInt8": "lowbit.recipe",
    "Prune": "lowbit.recipe",
    "Recipe": "lowbit.recipe",
    "SmoothQuant": "lowbit.recipe",
    "SparseGPT": "lowbit.recipe",
    "WeightQuant": "lowbit.recipe",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from lowbit.api import load, quantize, save
    from lowbit.recipe import (
        AWQ,
        GPTQ,
        AutoRound,
        RTN,
        ActQuant,
        LLMInt8,
        Prune,
        Recipe,
        SmoothQuant,
        SparseGPT,
        WeightQuant,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
