"""FloatQuantLinear: a Linear whose weight lives on a float grid (FP8, MXFP4, NVFP4; numerics/float_quant.py),
optionally quantizing its inputs to a float grid at run time too (FP8 W8A8, NVFP4 / MXFP4 W4A4).

Reference semantics: y = Q_in(x) W_hat^T + b. It is a WeightOnlyLinear to everything that asks (the pipeline, the
exporters' checks, the dequantized backend); it has no integer ``scales``/``qzeros`` and no PyTorch kernel on this
machine (``weight_kernel`` is None: the fast backend computes with the dequantized weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.numerics.float_formats import FLOAT_TYPES
from lowbit.numerics.float_quant import FloatQWeight, quantize_float_inputs
from lowbit.numerics.grid import group_count
from lowbit.runtime.weight_only import InputGrid, InputQuantizingStandIn, WeightOnlyLinear, filled

_SCALE_DTYPES = {"float32": torch.float32, "e8m0": torch.uint8, "e4m3": torch.float8_e4m3fn}


class FloatQuantLinear(WeightOnlyLinear):
    """Buffers: qweight uint8 [out, packed], fscale [out or 1, n_groups] (float32, uint8 E8M0 or float8_e4m3fn),
    fglobal float32 [1] (NVFP4), input_scale float32 [] (static FP8 inputs: the calibrated step), input_global
    float32 [1] (NVFP4 inputs: 448 * 6 / the calibrated absmax), bias [out] (if any)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        float_type: str,
        group_size: int,
        per_tensor: bool = False,
        input_type: str = "",
        input_per_token: bool = True,
        input_static: bool = False,
        has_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        nn.Module.__init__(self)  # WeightOnlyLinear's integer buffers (scales, qzeros) are not this grid's
        ft = FLOAT_TYPES[float_type]
        self._init_codes(in_features, out_features, ft.bits, group_size, True, per_tensor, False, device)
        self.float_type, self.g_idx = float_type, None
        self.input_type, self.input_per_token, self.input_static = input_type, input_per_token, input_static
        rows, n_groups = (1 if per_tensor else out_features), group_count(in_features, group_size)
        self.register_buffer("fscale", torch.empty(rows, n_groups, dtype=_SCALE_DTYPES[ft.scale_storage], device=device))
        self.fglobal: torch.Tensor | None
        self.input_scale: torch.Tensor | None
        self.input_global: torch.Tensor | None
        self.register_buffer("fglobal", torch.empty(1, device=device) if ft.has_global_scale else None)
        static_fp8 = input_type == "FP8" and input_static
        self.register_buffer("input_scale", torch.ones((), device=device) if static_fp8 else None)
        self.register_buffer("input_global", torch.ones(1, device=device) if input_type == "NVFP4" else None)
        self._init_bias(has_bias, dtype, device)

    @classmethod
    def from_qweight(cls, qweight: Any, bias: torch.Tensor | None, **extra: Any) -> FloatQuantLinear:
        assert isinstance(qweight, FloatQWeight)
        module = cls(qweight.in_features, qweight.out_features, qweight.kind, qweight.group_size,
                     per_tensor=qweight.scale.shape[0] == 1 and qweight.out_features > 1, has_bias=bias is not None,
                     dtype=bias.dtype if bias is not None else torch.float32, device=qweight.codes.device, **extra)
        return filled(module, qweight.pack(), bias)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "float_type": self.float_type,
                "group_size": self.group_size, "per_tensor": self.per_tensor, "input_type": self.input_type,
                "input_per_token": self.input_per_token, "input_static": self.input_static,
                "has_bias": self.bias is not None}

    def unpacked(self) -> FloatQWeight:  # type: ignore[override]
        tensors = {"qweight": self.qweight, "fscale": self.fscale}
        if self.fglobal is not None:
            tensors["fglobal"] = self.fglobal
        return FloatQWeight.unpack(tensors, self.float_type, self.group_size, self.in_features)

    def weight_kernel(self) -> nn.Module | None:
        return None

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_type:
            return x
        return quantize_float_inputs(x, FLOAT_TYPES[self.input_type], self.input_per_token, self.input_scale,
                                     self.input_global)

    def input_grid(self) -> InputGrid | None:
        """Float inputs: the format, per token or tensor, and the calibrated scales (FP8 static step, NVFP4 global)."""
        if not self.input_type:
            return None
        calibrated = tuple(float(t) for t in (self.input_scale, self.input_global) if t is not None)
        return ("float", self.input_type, self.input_per_token, calibrated)

    def calibration_stand_in(self, dtype: torch.dtype) -> nn.Module:
        return InputQuantizingStandIn(self, dtype) if self.input_type else super().calibration_stand_in(dtype)

    def extra_repr(self) -> str:
        grid = "per-tensor" if self.per_tensor else f"group_size={self.group_size}"
        inputs = f", inputs {self.input_type} {'static' if self.input_static else 'dynamic'}" if self.input_type else ""
        return f"in={self.in_features}, out={self.out_features}, {self.float_type} {grid}{inputs}"
