"""Activation quantization: each Linear's input quantized at run time, per token or per tensor, dynamic or static
(a calibrated absmax), on top of the recipe's weight rounding (W8A8 and friends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import ACTIVATIONS, Compression, LinearStats, Needs, Step, check
from lowbit.numerics.activations import static_scale_from_absmax
from lowbit.runtime.act_quant import ActQuantLinear


@dataclass(frozen=True)
class ActQuant(Step):
    """Quantize each Linear's input at run time: per-token or per-tensor, dynamic or static (calibrated)."""

    kind: ClassVar[str] = "act_quant"
    stage: ClassVar[int] = ACTIVATIONS
    quantizes_inputs: ClassVar[bool] = True
    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    symmetric: bool = True

    def check(self) -> None:
        check(2 <= self.bits <= 8, f"activation bits must be in 2..8, got {self.bits}")
        check(
            self.granularity in ("token", "tensor"),
            f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}",
        )
        check(
            self.dynamic or self.granularity == "tensor",
            "static activation quantization is per-tensor: use granularity='tensor' or dynamic=True",
        )

    def check_recipe(self, recipe) -> None:  # noqa: ANN001
        check(
            recipe.weight_step is not None,
            "act_quant needs a weight quantizer before it (e.g. rtn with bits=8, granularity='channel')",
        )

    @property
    def label(self) -> str:
        return f"A{self.bits} per-{self.granularity} {'dynamic' if self.dynamic else 'static'}"

    def needs(self) -> Needs:
        return Needs(input_absmax=not self.dynamic)

    def runtime_module(self, c: Compression, bias: torch.Tensor | None, stats: LinearStats) -> nn.Module | None:
        assert c.qweight is not None, "act_quant follows a rounding step (Recipe checks it)"
        module = ActQuantLinear.from_qweight(
            c.qweight, bias, act_bits=self.bits, act_per_token=self.granularity == "token",
            act_symmetric=self.symmetric, act_static=not self.dynamic,
        )
        if not self.dynamic:
            assert stats.input_absmax is not None
            module.input_scale = static_scale_from_absmax(stats.input_absmax.max(), self.bits)
        return module

    def check_export(self, fmt: str) -> None:
        if fmt in ("gguf", "gptq"):
            raise LowbitError(f"{fmt.upper()} cannot express activation quantization (W8A8, LLM.int8()); export a "
                              "weight-only recipe, or W8A8 as compressed-tensors")
        if fmt == "compressed-tensors" and not self.symmetric:
            raise LowbitError(ASYMMETRIC_INPUTS)


ASYMMETRIC_INPUTS = ("compressed-tensors export writes symmetric input quantization only (what vLLM's int8 kernels "
                     "run); quantize with symmetric activations")
