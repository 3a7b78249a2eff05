"""Round-to-nearest: the baseline every other method is measured against."""

from __future__ import annotations

import torch

from lowbit.numerics.float_quant import FloatQWeight, float_rtn
from lowbit.numerics.ggml_fit import storable_steps, symmetric_steps
from lowbit.numerics.grid import fit_scale_zero, grouped, round_to_grid, symmetric_zero
from lowbit.numerics.kquant import KQWeight, k_rtn, k_type
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.range_search import SEARCHES, searched_scale_zero
from lowbit.methods.base import WeightQuant


def group_size_for(spec: WeightQuant, in_features: int) -> int:
    """Input columns sharing one scale: the whole row unless the grid is per-group."""
    return spec.group_size if spec.granularity == "group" else in_features


def weight_ranges(W: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of W [out, in] -> two [out or 1, n_groups] tensors. A last partial group is allowed."""
    if spec.granularity == "tensor":
        return W.min().reshape(1, 1), W.max().reshape(1, 1)
    Wg = grouped(W, group_size_for(spec, W.shape[1]))  # [out, n_groups, gs]
    return Wg.amin(dim=-1), Wg.amax(dim=-1)


def _searched_grid(W: torch.Tensor, spec: WeightQuant, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out or 1, n_groups] of W [out, in] from ``spec.fit``'s range search (numerics/range_search.py),
    each column weighted by ``importance`` [in] where that search weighs."""
    search = SEARCHES[spec.fit]
    if spec.granularity == "tensor":  # one group holding every weight, each weighted by its column's importance
        imp = importance.float().repeat(W.shape[0]).view(1, -1) if importance is not None else None
        return searched_scale_zero(W.reshape(1, 1, -1), spec.bits, spec.symmetric, search, imp)
    gs = group_size_for(spec, W.shape[1])
    imp = grouped(importance.float().view(1, -1), gs)[0] if importance is not None else None  # [n_groups, gs]
    return searched_scale_zero(grouped(W, gs), spec.bits, spec.symmetric, search, imp)


def fit_grid(
    W: torch.Tensor, spec: WeightQuant, importance: torch.Tensor | None = None, sigma2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out or 1, n_groups] of W [out, in] (float32) on ``spec``'s grid: from each group's range, or
    for a symmetric grid of llama.cpp's fit (``spec.fit == "llama"``) its signed step, searched under the columns'
    ``importance`` [in] when given, with each row's mean x^2 ``sigma2`` [out] (default: W's own). Asymmetric groups
    keep their range under either fit (numerics/ggml_fit.py says why). The "mse" and "imatrix-mse" fits search a
    shrunk range per group (numerics/range_search.py), the latter under ``importance``."""
    if spec.fit in SEARCHES:
        return _searched_grid(W, spec, importance)
    if spec.fit != "llama" or not spec.symmetric:
        wmin, wmax = weight_ranges(W, spec)
        return fit_scale_zero(wmin, wmax, spec.bits, spec.symmetric)
    out, n = W.shape
    gs = group_size_for(spec, n)
    Wg = grouped(W, gs)  # padded with zero weights of zero importance: they change no fit
    imp = grouped(importance.float().view(1, -1), gs)[0] if importance is not None else None  # [n_groups, gs]
    row_sigma2 = (W.pow(2).mean(dim=1) if sigma2 is None else sigma2).view(out, 1, 1)
    scale = storable_steps(symmetric_steps(Wg, spec.bits, imp, row_sigma2))
    return scale, torch.full_like(scale, float(symmetric_zero(spec.bits)))


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


def rtn(
    W: torch.Tensor, spec: WeightQuant, importance: torch.Tensor | None = None,
    tensor_absmax: torch.Tensor | None = None,
) -> QWeight | KQWeight | FloatQWeight:
    """Round W [out, in] to the nearest point of its grid (a K-quant grid's: numerics/kquant.py; a float one's:
    numerics/float_quant.py), fitted under the columns' ``importance`` [in] where the grid's fit uses one; NVFP4's
    tensor scale from ``tensor_absmax`` where given (shared by the Linears a server fuses)."""
    spec = spec.for_width(W.shape[1])
    if spec.float_type:
        return float_rtn(W, spec.float_type, group_size_for(spec, W.shape[1]), spec.granularity == "tensor",
                         tensor_absmax)
    if spec.ggml:
        return k_rtn(W, k_type(spec.ggml), importance)
    W = W.float()
    scale, zero = fit_grid(W, spec, importance)
    return quantize_with_grid(W, scale, zero, spec)
