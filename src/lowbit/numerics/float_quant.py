"""Weights and activations on the float grids (numerics/float_formats.py): FloatQWeight, the counterpart of QWeight
for FP8, MXFP4 and NVFP4, its round-to-nearest fit, and the run-time quantization of a Linear's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.float_formats import (
    FLOAT_TYPES,
    FloatType,
    abs_max,
    block_scales,
    element_codes,
    element_values,
    fake_quantize_blocks,
    global_scale,
    round_e4m3_,
    stored_steps,
)
from lowbit.numerics.grid import grouped
from lowbit.numerics.packing import pack_bits, unpack_bits
from lowbit.numerics.qweight import CodesShape


@dataclass
class FloatQWeight(CodesShape):
    """A weight on a float grid: ``W_hat[o, j] = element(codes[o, j]) * step[o, j // group_size]``.

    codes    uint8 [out, in]: E4M3 bytes (FP8) or E2M1 codes (MXFP4, NVFP4)
    scale    [out or 1, n_groups] as stored: float32 (FP8), uint8 E8M0 exponents (MXFP4), float8_e4m3fn (NVFP4)
    global_  float32 [1], NVFP4 only: step = scale / global_
    """

    codes: torch.Tensor
    scale: torch.Tensor
    global_: torch.Tensor | None
    kind: str
    group_size: int

    g_idx = None  # blocks are always in column order
    symmetric = True

    @property
    def ftype(self) -> FloatType:
        return FLOAT_TYPES[self.kind]

    @property
    def bits(self) -> int:
        return self.ftype.bits

    @property
    def groups_in_order(self) -> bool:
        return True

    def steps(self) -> torch.Tensor:
        """float32 [out or 1, n_groups]: what each group's element codes are multiplied by."""
        return stored_steps(self.scale, self.ftype, self.global_)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = torch.arange(self.in_features, device=self.codes.device) // self.group_size
        return (element_values(self.codes, self.ftype) * self.steps()[:, idx]).to(dtype)

    def pack(self) -> dict[str, torch.Tensor]:
        """Storage tensors: E2M1 codes two to a byte (low nibble first), E4M3 codes one per byte, the stored scales,
        NVFP4's global scale."""
        out = {"qweight": pack_bits(self.codes, self.bits), "fscale": self.scale}
        if self.global_ is not None:
            out["fglobal"] = self.global_
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], kind: str, group_size: int, in_features: int) -> FloatQWeight:
        ft = FLOAT_TYPES[kind]
        try:
            codes = unpack_bits(tensors["qweight"], ft.bits, in_features)
            scale = tensors["fscale"]
            global_ = tensors["fglobal"] if ft.has_global_scale else None
        except KeyError as exc:
            raise LowbitError(f"packed weight is missing tensor {exc}; the checkpoint is incomplete") from None
        return cls(codes, scale, global_, kind, group_size)


def check_width(ft: FloatType, in_features: int, what: str = "a Linear") -> None:
    """MXFP4 and NVFP4 blocks are whole runs of 32 / 16 columns (the formats have no partial block)."""
    if ft.block and in_features % ft.block:
        raise LowbitError(f"{ft.name} needs widths divisible by {ft.block}, but {what} has {in_features} input "
                          "columns; leave it in float (the recipe's \"ignore\") or use an integer grid")


def group_absmax(W: torch.Tensor, group_size: int, per_tensor: bool = False) -> torch.Tensor:
    """absmax of W [out, in] per group of ``group_size`` columns: [out, n_groups] ([1, 1] per tensor)."""
    if per_tensor:
        return W.abs().amax().reshape(1, 1)
    return grouped(W.abs(), group_size).amax(dim=-1)


def tensor_global_scale(W: torch.Tensor, ft: FloatType, absmax: torch.Tensor | None = None) -> torch.Tensor | None:
    """NVFP4's global scale: of ``absmax`` where given (the Linears a server fuses share one: vLLM multiplies q/k/v
    and gate/up with one tensor scale), else of the whole (original) weight; None for the other types."""
    if not ft.has_global_scale:
        return None
    return global_scale(W.abs().amax() if absmax is None else absmax)


def float_codes(W: torch.Tensor, steps: torch.Tensor, group_size: int, ft: FloatType) -> torch.Tensor:
    """uint8 element codes of W [out, in] on per-group ``steps`` [out or 1, n_groups]."""
    idx = torch.arange(W.shape[1], device=W.device) // group_size
    return element_codes(W.float() / steps[:, idx], ft)


def float_rtn(
    W: torch.Tensor, kind: str, group_size: int, per_tensor: bool = False, tensor_absmax: torch.Tensor | None = None
) -> FloatQWeight:
    """Round W [out, in] to the nearest point of float grid ``kind`` with one scale per ``group_size`` columns of
    each row (or one for the whole tensor); NVFP4's tensor scale from ``tensor_absmax`` where given."""
    ft = FLOAT_TYPES[kind]
    check_width(ft, W.shape[1])
    W = W.float()
    global_ = tensor_global_scale(W, ft, tensor_absmax)
    stored, steps = block_scales(group_absmax(W, group_size, per_tensor), ft, global_)
    return FloatQWeight(float_codes(W, steps, group_size, ft), stored, global_, kind, group_size)


def quantize_float_inputs(
    x: torch.Tensor, ft: FloatType, per_token: bool = True, static_scale: torch.Tensor | None = None,
    global_: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., features] fake-quantized on float grid ``ft`` at run time, in x's dtype: FP8 per token (dynamic) or
    per tensor on the calibrated step ``static_scale``; MXFP4 and NVFP4 per block of the features (NVFP4's
    ``global_`` calibrated: 448 * 6 / absmax of the calibration inputs)."""
    xf = x.float()
    if ft.block:
        blocks = xf.reshape(*xf.shape[:-1], -1, ft.block)  # [..., n_blocks, block]
        return fake_quantize_blocks(blocks, abs_max(blocks), ft, global_).reshape(x.shape).to(x.dtype)
    if static_scale is not None:
        step = static_scale.float()
    else:
        absmax = abs_max(xf, keepdim=True) if per_token else xf.abs().amax()
        _, step = block_scales(absmax, ft)
    return round_e4m3_(xf / step).mul_(step).to(x.dtype)  # element_values(element_codes(x / step)) * step
