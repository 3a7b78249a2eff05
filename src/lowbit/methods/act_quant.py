"""Activation quantization: each Linear's input quantized at run time, per token or per tensor, dynamic or static
(a calibrated absmax), on top of the recipe's weight rounding (W8A8 and friends); on an integer grid, or on a float
one (FP8 per token or per tensor; NVFP4 and MXFP4 per block of each token) paired with weights of the same type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import ACTIVATIONS, Compression, LinearStats, Needs, Step, check
from lowbit.numerics.activations import static_scale_from_absmax
from lowbit.numerics.float_formats import FLOAT_TYPES, block_scales, global_scale
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.float_linear import FloatQuantLinear


@dataclass(frozen=True)
class ActQuant(Step):
    """Quantize each Linear's input at run time: per-token or per-tensor, dynamic or static (calibrated).
    ``float_type`` ("FP8", "NVFP4", "MXFP4"): on that float grid instead of an integer one, with the weights on the
    same type; NVFP4 and MXFP4 inputs are scaled per block of 16 / 32 features of each token (granularity "token",
    dynamic), NVFP4's tensor scale calibrated from the inputs' absmax."""

    kind: ClassVar[str] = "act_quant"
    stage: ClassVar[int] = ACTIVATIONS
    quantizes_inputs: ClassVar[bool] = True
    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    symmetric: bool = True
    float_type: str = ""

    def check(self) -> None:
        check(2 <= self.bits <= 8, f"activation bits must be in 2..8, got {self.bits}")
        if self.float_type:
            ft = FLOAT_TYPES.get(self.float_type)
            check(ft is not None, f"activation float_type must be one of {', '.join(FLOAT_TYPES)}, got {self.float_type!r}")
            assert ft is not None
            check(self.bits == ft.bits and self.symmetric, f"{ft.name} inputs are bits={ft.bits}, symmetric=true")
            check(not ft.block or (self.granularity == "token" and self.dynamic),
                  f"{ft.name} inputs are scaled per block of {ft.block} features of each token, at run time",
                  "use granularity \"token\" and dynamic true")
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
        grid = recipe.weight_step.grid
        check(grid is None or grid.float_type == self.float_type,
              f"{self.float_type or 'integer'} inputs need weights on the same kind of grid, got "
              f"{grid.label if grid is not None else ''}", "pair FP8 inputs with FP8 weights, NVFP4 with NVFP4, integer with integer")

    @property
    def label(self) -> str:
        kind = f"A{self.bits}{f' {self.float_type}' if self.float_type else ''}"
        if self.float_type and FLOAT_TYPES[self.float_type].block:
            return f"{kind} dynamic"
        return f"{kind} per-{self.granularity} {'dynamic' if self.dynamic else 'static'}"

    def needs(self) -> Needs:
        return Needs(input_absmax=not self.dynamic or self.float_type == "NVFP4")

    def runtime_module(self, c: Compression, bias: torch.Tensor | None, stats: LinearStats) -> nn.Module | None:
        assert c.qweight is not None, "act_quant follows a rounding step (Recipe checks it)"
        if self.float_type:
            return self._float_module(c, bias, stats)
        module = ActQuantLinear.from_qweight(
            c.qweight, bias, act_bits=self.bits, act_per_token=self.granularity == "token",
            act_symmetric=self.symmetric, act_static=not self.dynamic,
        )
        if not self.dynamic:
            assert stats.input_absmax is not None
            module.input_scale = static_scale_from_absmax(stats.input_absmax.max(), self.bits)
        return module

    def _float_module(self, c: Compression, bias: torch.Tensor | None, stats: LinearStats) -> nn.Module:
        module = FloatQuantLinear.from_qweight(c.qweight, bias, input_type=self.float_type,
                                               input_per_token=self.granularity == "token", input_static=not self.dynamic)
        if module.input_scale is not None or module.input_global is not None:
            assert stats.input_absmax is not None
            absmax = stats.input_absmax.max().float()
            if module.input_scale is not None:  # FP8 static: the calibrated step
                module.input_scale = block_scales(absmax, FLOAT_TYPES[self.float_type])[1]
            else:  # NVFP4: the tensor scale of the calibration inputs
                module.input_global = global_scale(absmax)
        return module

    def check_export(self, fmt: str) -> None:
        if fmt in ("gguf", "gptq"):
            raise LowbitError(f"{fmt.upper()} cannot express activation quantization (W8A8, LLM.int8()); export a "
                              "weight-only recipe, or W8A8 as compressed-tensors")
        if fmt == "compressed-tensors" and not self.symmetric:
            raise LowbitError(ASYMMETRIC_INPUTS)


ASYMMETRIC_INPUTS = ("compressed-tensors export writes symmetric input quantization only (what vLLM's int8 kernels "
                     "run); quantize with symmetric activations")
