"""Round-to-nearest: the baseline every other method is measured against."""

from __future__ import annotations

import torch

from lowbit.numerics.grid import fit_scale_zero, group_count, round_to_grid
from lowbit.numerics.kquant import KQWeight, k_rtn, k_type
from lowbit.numerics.qweight import QWeight
from lowbit.methods.base import WeightQuant


def group_size_for(spec: WeightQuant, in_features: int) -> int:
    """Input columns sharing one scale: the whole row unless the grid is per-group."""
    return spec.group_size if spec.granularity == "group" else in_features


def weight_ranges(W: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of W [out, in] -> two [out or 1, n_groups] tensors. A last partial group is allowed."""
    if spec.granularity == "tensor":
        return W.min().reshape(1, 1), W.max().reshape(1, 1)
    out, n = W.shape
    gs = group_size_for(spec, n)
    n_groups = group_count(n, gs)
    # zero padding changes no range: asymmetric ranges always include 0, absmax ignores it
    Wg = torch.nn.functional.pad(W, (0, n_groups * gs - n)).view(out, n_groups, gs)  # [out, n_groups, gs]
    return Wg.amin(dim=-1), Wg.amax(dim=-1)


def quantize_with_grid(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightQuant, g_idx: torch.Tensor | None = None
) -> QWeight:
    """Round W [out, in] on a given grid (scale/zero [out or 1, n_groups], float32) into a QWeight."""
    gs = group_size_for(spec, W.shape[1])
    idx = g_idx.long() if g_idx is not None else torch.arange(W.shape[1], device=W.device) // gs
    codes = round_to_grid(W.float(), scale[:, idx], zero[:, idx], spec.bits).to(torch.uint8)
    return QWeight(
        codes=codes,
        scale=scale.half(),
        zero=None if spec.symmetric else zero.to(torch.uint8),
        bits=spec.bits,
        group_size=gs,
        g_idx=g_idx,
    )


def rtn(W: torch.Tensor, spec: WeightQuant) -> QWeight | KQWeight:
    """Round W [out, in] to the nearest point of its min-max grid (a K-quant grid's: numerics/kquant.py)."""
    spec = spec.for_width(W.shape[1])
    if spec.ggml:
        return k_rtn(W, k_type(spec.ggml))
    W = W.float()
    wmin, wmax = weight_ranges(W, spec)
    scale, zero = fit_scale_zero(wmin, wmax, spec.bits, spec.symmetric)
    return quantize_with_grid(W, scale, zero, spec)
