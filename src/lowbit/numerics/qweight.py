"""QWeight: a quantized weight matrix, the bridge between fake-quant (``dequantize``) and packed storage (``pack``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.grid import SCALE_DTYPE, symmetric_zero
from lowbit.numerics.packing import pack_bits, unpack_bits


class CodesShape:
    """The Linear shape of a weight held as integer ``codes`` [out, in] (QWeight, KQWeight)."""

    codes: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


@dataclass
class QWeight(CodesShape):
    """Integer codes plus the grid that maps them back: ``W_hat[o, j] = (codes[o, j] - zero[o, g]) * scale[o, g]``
    with ``g = g_idx[j]`` (``j // group_size`` when ``g_idx`` is None).

    codes  uint8 [out, in], values in 0 .. 2**bits - 1
    scale  float16 [out or 1, n_groups]   (1 row for a per-tensor grid)
    zero   uint8 [out or 1, n_groups], or None for a symmetric grid (zero = 2**(bits-1))
    g_idx  int32 [in] or None; set when act-order visits columns out of order (GPTQ desc_act)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.codes.device) // self.group_size

    @property
    def groups_in_order(self) -> bool:
        """Whether every group is a run of consecutive columns (no act-order permutation, or static groups): what
        formats storing one scale per block of columns (GGUF, compressed-tensors, PyTorch's int4 kernel) need."""
        if self.g_idx is None:
            return True
        in_order = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        return torch.equal(self.g_idx.long(), in_order)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fake-quant weight W_hat [out, in], computed in float32."""
        idx = self.group_index()
        scale = self.scale.float()[:, idx]  # [out or 1, in]
        zero = self.zero.float()[:, idx] if self.zero is not None else float(symmetric_zero(self.bits))
        return ((self.codes.float() - zero) * scale).to(dtype)

    def pack(self) -> dict[str, torch.Tensor]:
        """Storage tensors: codes and zeros bit-packed along the input dimension, float16 scales."""
        out = {"qweight": pack_bits(self.codes, self.bits), "scales": self.scale.to(SCALE_DTYPE)}
        if self.zero is not None:
            out["qzeros"] = pack_bits(self.zero, self.bits)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.to(torch.int32)
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, in_features: int) -> QWeight:
        """Inverse of ``pack``; ``bits``, ``group_size`` and ``in_features`` come from the stored config."""
        try:
            scale = tensors["scales"]
            codes = unpack_bits(tensors["qweight"], bits, in_features)
        except KeyError as exc:
            raise LowbitError(f"packed weight is missing tensor {exc}; the checkpoint is incomplete") from None
        zero = unpack_bits(tensors["qzeros"], bits, scale.shape[1]) if "qzeros" in tensors else None
        return cls(codes, scale, zero, bits, group_size, tensors.get("g_idx"))
