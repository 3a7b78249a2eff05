"""LLM.int8() (Dettmers et al. 2022): input columns with |x| > threshold multiply in float, the rest in INT8 per
token x INT8 per channel. A complete scheme: it rounds the weights and quantizes the inputs itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import ROUND, Compression, LinearStats, Step, WeightQuant, check
from lowbit.numerics.rtn import rtn
from lowbit.runtime.llm_int8 import Int8OutlierLinear

INT8_PER_CHANNEL = WeightQuant(bits=8, symmetric=True, granularity="channel")


@dataclass(frozen=True)
class LLMInt8(Step):
    kind: ClassVar[str] = "llm_int8"
    stage: ClassVar[int] = ROUND
    quantizes_inputs: ClassVar[bool] = True
    threshold: float = 6.0

    def check(self) -> None:
        check(0 < self.threshold < math.inf, f"llm_int8 threshold must be a finite number > 0, got {self.threshold}")

    def check_recipe(self, recipe) -> None:  # noqa: ANN001
        check(len(recipe.steps) == 1, "llm_int8 is a complete scheme (INT8 weights and inputs): use it alone")

    @property
    def rounds(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"llm.int8 t={self.threshold}"

    def compress(self, c: Compression, stats: LinearStats) -> None:
        c.qweight = rtn(c.weight, INT8_PER_CHANNEL)

    def runtime_module(self, c: Compression, bias: torch.Tensor | None, stats: LinearStats) -> nn.Module | None:
        assert c.qweight is not None
        return Int8OutlierLinear.from_qweight(c.qweight, bias, threshold=self.threshold)

    def check_export(self, fmt: str) -> None:
        if fmt in ("gguf", "gptq"):
            raise LowbitError(f"{fmt.upper()} cannot express activation quantization (W8A8, LLM.int8()); export a "
                              "weight-only recipe")
        if fmt == "compressed-tensors":
            raise LowbitError("compressed-tensors has no LLM.int8() format (outlier columns in float); export a W8A8 "
                              "recipe such as smoothquant-w8a8 instead, or keep lowbit's own format")
