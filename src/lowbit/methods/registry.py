"""The one list of methods: a recipe step type per module. A new method is a module and a line here."""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.methods.act_quant import ActQuant
from lowbit.methods.autoround import AutoRound
from lowbit.methods.awq import AWQ
from lowbit.methods.base import Step
from lowbit.methods.gptq import GPTQ
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.prune import Prune
from lowbit.methods.rotate import Rotate
from lowbit.methods.rtn import RTN
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.methods.sparsegpt import SparseGPT

STEP_TYPES: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Make ``cls`` a recipe step type under its ``kind`` (usable as a class decorator)."""
    if not cls.kind or cls.kind in STEP_TYPES and STEP_TYPES[cls.kind] is not cls:
        raise LowbitError(f"step kind {cls.kind!r} is empty or already registered")
    STEP_TYPES[cls.kind] = cls
    return cls


for _cls in (Rotate, RTN, GPTQ, AutoRound, AWQ, SmoothQuant, ActQuant, LLMInt8, Prune, SparseGPT):
    register(_cls)
