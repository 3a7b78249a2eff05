"""KQuantLinear: a Linear whose weight lives on a llama.cpp K-quant grid (numerics/kquant.py), stored as lowbit
checkpoints store every grid (bit-packed codes) plus the grid's two levels, so the GGUF export copies it exactly.

It is a WeightOnlyLinear to everything that asks (the pipeline, the exporters' type checks, the dequantized
backend); it has no per-group ``scales``/``qzeros`` and no int4/int8 kernel (``weight_kernel`` is None: the fast
backend computes with the dequantized weight, as it does for any grid without a kernel).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.numerics.float_quant import FloatQWeight
from lowbit.numerics.kquant import K_TYPES, SUPER_BLOCK, KQWeight, KType
from lowbit.numerics.qweight import QWeight
from lowbit.runtime.float_linear import FloatQuantLinear
from lowbit.runtime.weight_only import WeightOnlyLinear, filled


def register_k_levels(module: nn.Module, rows: int, width: int, kt: KType, device: torch.device | str) -> None:
    """A K grid's two levels as empty buffers of ``module`` (a weight [rows, width]): kd float16 [rows, width / 256],
    ksc int8 [rows, width / sub], and for the asymmetric types kdmin and km likewise (else None)."""
    n_super, n_sub = width // SUPER_BLOCK, width // kt.sub
    module.register_buffer("kd", torch.empty(rows, n_super, dtype=torch.float16, device=device))
    module.register_buffer("ksc", torch.empty(rows, n_sub, dtype=torch.int8, device=device))
    asym = kt.asymmetric
    module.register_buffer("kdmin", torch.empty(rows, n_super, dtype=torch.float16, device=device) if asym else None)
    module.register_buffer("km", torch.empty(rows, n_sub, dtype=torch.int8, device=device) if asym else None)


class KQuantLinear(WeightOnlyLinear):
    """Buffers: qweight uint8 [out, packed], kd float16 [out, in / 256], ksc int8 [out, in / sub], kdmin float16
    and km int8 likewise (asymmetric types only), bias [out] (if any)."""

    kdmin: torch.Tensor | None
    km: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ggml: str,
        has_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        nn.Module.__init__(self)  # WeightOnlyLinear's buffers (scales, qzeros) are not this grid's
        kt = K_TYPES[ggml]
        self._init_codes(in_features, out_features, kt.bits, kt.sub, not kt.asymmetric, False, False, device)
        self.ggml = ggml
        register_k_levels(self, out_features, in_features, kt, device)
        self.g_idx = None
        self._init_bias(has_bias, dtype, device)

    @classmethod
    def from_qweight(cls, qweight: QWeight | KQWeight, bias: torch.Tensor | None, **extra: Any) -> KQuantLinear:
        assert isinstance(qweight, KQWeight)
        module = cls(qweight.in_features, qweight.out_features, qweight.kind, has_bias=bias is not None,
                     dtype=bias.dtype if bias is not None else torch.float32, device=qweight.codes.device)
        return filled(module, qweight.pack(), bias)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "ggml": self.ggml,
                "has_bias": self.bias is not None}

    def unpacked(self) -> KQWeight:  # type: ignore[override]
        tensors = {"qweight": self.qweight, "kd": self.kd, "ksc": self.ksc}
        if self.kdmin is not None and self.km is not None:
            tensors.update(kdmin=self.kdmin, km=self.km)
        return KQWeight.unpack(tensors, self.ggml, self.in_features)

    def weight_kernel(self) -> nn.Module | None:
        return None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.ggml}"


def weight_only_linear(qweight: QWeight | KQWeight | FloatQWeight, bias: torch.Tensor | None) -> WeightOnlyLinear:
    """The runtime module holding a rounded Linear: KQuantLinear for a K grid, FloatQuantLinear for a float one,
    else WeightOnlyLinear."""
    if isinstance(qweight, FloatQWeight):
        return FloatQuantLinear.from_qweight(qweight, bias)
    if isinstance(qweight, KQWeight):
        return KQuantLinear.from_qweight(qweight, bias)
    return WeightOnlyLinear.from_qweight(qweight, bias)


def k_grid_refusal(name: str, ggml: str, fmt: str) -> str:
    return (f"{name} is on llama.cpp's {ggml} grid, which {fmt} cannot hold: export --format gguf, or quantize on an "
            "integer grid (e.g. gptq-w4g128-sym)")
