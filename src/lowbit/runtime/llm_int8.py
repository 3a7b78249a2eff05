"""Int8OutlierLinear: LLM.int8()'s mixed-precision decomposition.

Input columns holding any |x| > threshold in this call are outliers: they multiply their weight columns in
float. All other columns are quantized per token to INT8 and multiply the INT8 (per-output-channel) weights. The
two partial products are summed. Written as one matmul over a mixed input, which equals the sum of the two.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.numerics.activations import quantize_activations
from torch import nn

from lowbit.runtime.kernels import int8_int8_weights
from lowbit.runtime.weight_only import InputGrid, InputQuantizingStandIn, WeightOnlyLinear


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [in]: columns of x [..., in] where any token exceeds the threshold in magnitude (from each column's
    largest and smallest value: no [tokens, in] |x| or mask tensor, in every forward)."""
    rows = x.reshape(-1, x.shape[-1])
    return (rows.amax(dim=0) > threshold) | (rows.amin(dim=0) < -threshold)


class Int8OutlierLinear(WeightOnlyLinear):
    def __init__(self, *args: Any, threshold: float = 6.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold": self.threshold}

    def fast_module(self) -> nn.Module | None:
        """The INT8 part on the int8 x int8 -> int32 kernel (runtime/kernels.py), the outlier columns in float."""
        from lowbit.runtime.fast import Int8OutlierKernelLinear

        w8a8 = int8_int8_weights(self.unpacked())
        return Int8OutlierKernelLinear(self, *w8a8) if w8a8 is not None else None

    def calibration_stand_in(self, dtype: torch.dtype) -> nn.Module:
        return InputQuantizingStandIn(self, dtype)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """Outlier columns as they are, the rest quantized to INT8 per token."""
        outliers = outlier_columns(x, self.threshold)  # [in]
        regular = quantize_activations(x.masked_fill(outliers, 0.0), 8, per_token=True, symmetric=True)
        if torch.is_grad_enabled() and x.requires_grad:  # out= records no graph
            return torch.where(outliers, x, regular)
        return torch.where(outliers, x, regular, out=regular)  # into regular's memory, not a new tensor

    def input_grid(self) -> InputGrid:
        """The outlier threshold is all that decides the mixed input."""
        return ("llm.int8", self.threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier threshold={self.threshold}"
