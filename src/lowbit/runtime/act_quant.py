"""ActQuantLinear: quantized weights and inputs quantized at run time (W8A8 and friends).

Reference semantics: y = Q(x) W_hat^T + b, with Q per token (dynamic) or per tensor (dynamic, or static with a
calibrated scale). An int8 x int8 -> int32 kernel computes the same product exactly in integers; the float
form here is what every backend must match.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.numerics.activations import quantize_activations
from torch import nn

from lowbit.runtime.kernels import int8_int8_weights
from lowbit.runtime.weight_only import InputGrid, InputQuantizingStandIn, WeightOnlyLinear


class ActQuantLinear(WeightOnlyLinear):
    def __init__(
        self,
        *args: Any,
        act_bits: int = 8,
        act_per_token: bool = True,
        act_symmetric: bool = True,
        act_static: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.act_bits, self.act_per_token, self.act_symmetric = act_bits, act_per_token, act_symmetric
        self.act_static = act_static
        device = self.qweight.device
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device) if act_static else None)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "act_bits": self.act_bits,
            "act_per_token": self.act_per_token,
            "act_symmetric": self.act_symmetric,
            "act_static": self.act_static,
        }

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activations(x, self.act_bits, self.act_per_token, self.act_symmetric, self.input_scale)

    def fast_module(self) -> nn.Module | None:
        """W8A8 with symmetric INT8 inputs on the int8 x int8 -> int32 kernel (runtime/kernels.py); other grids
        the weight-only kernels on fake-quantized inputs; None where neither fits."""
        from lowbit.runtime.fast import Int8Int8KernelLinear, QuantizedInputs

        if self.act_bits == 8 and self.act_symmetric:
            w8a8 = int8_int8_weights(self.unpacked())
            if w8a8 is not None:
                return Int8Int8KernelLinear(self, *w8a8)
        kernel = self.weight_kernel()
        return QuantizedInputs(self, kernel) if kernel is not None else None

    def calibration_stand_in(self, dtype: torch.dtype) -> nn.Module:
        return InputQuantizingStandIn(self, dtype)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_input(x)

    def input_grid(self) -> InputGrid:
        """Integer inputs: bits, per token or tensor, symmetric, and the calibrated step of a static grid."""
        static = float(self.input_scale) if self.input_scale is not None else None
        return ("int", self.act_bits, self.act_per_token, self.act_symmetric, static)

    def extra_repr(self) -> str:
        act = f"A{self.act_bits} {'static' if self.act_static else 'dynamic'} per-{'token' if self.act_per_token else 'tensor'}"
        return f"{super().extra_repr()}, {act}"
