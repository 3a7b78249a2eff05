"""SparseLinear: a pruned (not quantized) Linear stored compactly as a bitmap of kept weights plus their values.

At 50% sparsity, unstructured or 2:4, this is 1 bit per weight plus half the values: 2.125 bytes per float32
weight instead of 4 (1.06 per bfloat16 instead of 2). For 2:4 the bitmap costs exactly what 2-bit in-group indices
would. Forward scatters the values into a dense weight and multiplies (PyTorch's semi-structured sparse kernels
are CUDA-only; the dense product is what every backend must match). The ``fast`` backend keeps the dense weight
after loading instead: fp32 speed for fp32-plus-packed memory, since there is no CPU kernel that gains from 2:4.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics.packing import pack_bits, packed_length, unpack_bits


class SparseLinear(nn.Module):
    """Buffers: mask uint8 [out, ceil(in / 8)] (bit j of a row = weight j kept), values [nnz] (kept weights in
    row-major order), bias [out] (if any)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        has_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.register_buffer("mask", torch.empty(out_features, packed_length(in_features, 1), dtype=torch.uint8, device=device))
        self.register_buffer("values", torch.empty(nnz, dtype=dtype, device=device))
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if has_bias else None)

    @classmethod
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
        """From a pruned weight W [out, in] (zeros are the pruned entries)."""
        keep = W != 0
        module = cls(W.shape[1], W.shape[0], int(keep.sum()), bias is not None, W.dtype, W.device)
        module.mask = pack_bits(keep.to(torch.uint8), 1)
        module.values = W[keep].contiguous()
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored per module in lowbit_config.json."""
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.nnz,
                "has_bias": self.bias is not None}

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] with zeros where weights were pruned."""
        keep = unpack_bits(self.mask, 1, self.in_features).bool()
        W = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        W[keep] = self.values
        return W if dtype is None else W.to(dtype)

    def fast_module(self) -> nn.Module:
        """The dense weight kept instead of scattered on every call (bit-identical outputs, more memory)."""
        from lowbit.runtime.fast import DequantizedLinear

        return DequantizedLinear(self, self.dense_weight())

    def calibration_stand_in(self, dtype: torch.dtype) -> nn.Module:
        """A plain Linear holding the dense weight (bit-identical outputs) until the block is finished."""
        from lowbit.runtime.weight_only import _linear

        return _linear(self.dense_weight(dtype), self.bias, dtype)

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dense_weight(dtype)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.float_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kept={self.nnz / (self.in_features * self.out_features):.1%}"
