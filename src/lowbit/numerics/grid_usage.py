"""How much of an integer grid a tensor really uses: the seed's claim that one outlier channel stretches a min-max
grid so far that ordinary values round to zero, measured instead of asserted.

Every integer grid here is symmetric absmax (the grid W8A8 and LLM.int8() use); the float grids (FP8 per tensor and
per token, NVFP4 and MXFP4 per block; numerics/float_formats.py) are measured the same way on their element codes.
Two numbers per (tensor, grid):
  * ``zero_share``: the share of non-zero values whose code is the zero code, i.e. that the grid erases;
  * ``effective_levels``: exp(entropy of the code histogram), the number of equally used levels that would carry
    the same information. A grid whose values all land on 3 codes scores about 3, whatever its bit width says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.numerics.float_formats import FLOAT_TYPES, block_scales, element_codes, global_scale
from lowbit.numerics.grid import grouped



@dataclass(frozen=True)
class GridUsage:
    zero_share: float
    effective_levels: float


def grid_usage(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> GridUsage:
    """Usage of the symmetric grid whose range is ``absmax`` (broadcast against x) by the values of x."""
    qmax = (1 << (bits - 1)) - 1  # codes -qmax..qmax, the symmetric grid of lowbit's RTN and W8A8
    xf = x.float()
    scale = absmax.float().clamp(min=torch.finfo(torch.float32).tiny) / qmax
    codes = torch.round(xf / scale).clamp_(-qmax, qmax)
    nonzero = torch.count_nonzero(xf)
    erased = torch.count_nonzero((codes == 0) & (xf != 0))
    counts = torch.histc(codes, bins=2 * qmax + 1, min=-qmax - 0.5, max=qmax + 0.5).double()
    p = counts[counts > 0] / counts.sum()
    return GridUsage(float(erased) / max(int(nonzero), 1), float(torch.exp(-(p * p.log()).sum())))


def activation_usage(x: torch.Tensor, bits: int, tensor_absmax: torch.Tensor | None = None) -> dict[str, GridUsage]:
    """x [tokens, features] under a per-tensor grid (range ``tensor_absmax``, the calibrated static range, or x's own
    absmax) and under per-token grids (each row its own range)."""
    per_tensor = tensor_absmax if tensor_absmax is not None else x.abs().amax()
    return {
        "per_tensor": grid_usage(x, per_tensor, bits),
        "per_token": grid_usage(x, x.abs().amax(dim=1, keepdim=True), bits),  # [tokens, 1]
    }


def weight_usage(W: torch.Tensor, bits: int, group_size: int = 128) -> dict[str, GridUsage]:
    """W [out, in] under one per-tensor range, one range per output channel, and one per ``group_size`` columns."""
    out, n = W.shape
    gs = min(group_size, n)
    # each column reads its group's range: [out, n_groups] -> [out, in]
    group_absmax = grouped(W.float().abs(), gs).amax(dim=-1)[:, torch.arange(n, device=W.device) // gs]
    return {
        "per_tensor": grid_usage(W, W.abs().amax(), bits),
        "per_channel": grid_usage(W, W.abs().amax(dim=1, keepdim=True), bits),
        f"g{group_size}": grid_usage(W, group_absmax, bits),
    }


def _code_usage(x: torch.Tensor, codes: torch.Tensor, n_codes: int, zero_codes: tuple[int, ...]) -> GridUsage:
    """Usage of a float grid by x, from the element ``codes`` (uint8, shaped like x) it rounded to."""
    xf = x.float()
    erased = torch.count_nonzero(torch.isin(codes, torch.tensor(zero_codes, dtype=codes.dtype, device=codes.device)) & (xf != 0))
    counts = torch.bincount(codes.flatten().long(), minlength=n_codes).double()
    p = counts[counts > 0] / counts.sum()
    return GridUsage(float(erased) / max(int(torch.count_nonzero(xf)), 1), float(torch.exp(-(p * p.log()).sum())))


def float_usage(x: torch.Tensor, kind: str, absmax: torch.Tensor | None = None) -> GridUsage | None:
    """Usage of float grid ``kind`` by x [rows, features]: FP8 on the range ``absmax`` (broadcast; None: per row),
    NVFP4 / MXFP4 per block of each row (NVFP4's tensor scale from x's absmax). None where the width holds no
    whole number of blocks."""
    ft = FLOAT_TYPES[kind]
    xf = x.float()
    if ft.block:
        if xf.shape[-1] % ft.block:
            return None
        blocks = xf.reshape(*xf.shape[:-1], -1, ft.block)  # [rows, n_blocks, block]
        global_ = global_scale(xf.abs().amax()) if ft.has_global_scale else None
        _, step = block_scales(blocks.abs().amax(dim=-1), ft, global_)
        return _code_usage(blocks, element_codes(blocks / step.unsqueeze(-1), ft), 16, (0, 8))
    range_ = xf.abs().amax(dim=-1, keepdim=True) if absmax is None else absmax.float()
    _, step = block_scales(range_, ft)
    return _code_usage(xf, element_codes(xf / step, ft), 256, (0, 128))


def float_activation_usage(x: torch.Tensor, tensor_absmax: torch.Tensor | None = None) -> dict[str, GridUsage]:
    """x [tokens, features] under FP8 per tensor (the calibrated range ``tensor_absmax``, or x's own) and per token,
    and under NVFP4 / MXFP4 blocks (where the width allows)."""
    per_tensor = tensor_absmax if tensor_absmax is not None else x.abs().amax()
    usage = {"fp8_per_tensor": float_usage(x, "FP8", per_tensor), "fp8_per_token": float_usage(x, "FP8"),
             "nvfp4": float_usage(x, "NVFP4"), "mxfp4": float_usage(x, "MXFP4")}
    return {k: v for k, v in usage.items() if v is not None}


def float_weight_usage(W: torch.Tensor) -> dict[str, GridUsage]:
    """W [out, in] under FP8 per channel and NVFP4 / MXFP4 blocks (where the width allows)."""
    usage = {"fp8_per_channel": float_usage(W, "FP8"), "nvfp4": float_usage(W, "NVFP4"), "mxfp4": float_usage(W, "MXFP4")}
    return {k: v for k, v in usage.items() if v is not None}
