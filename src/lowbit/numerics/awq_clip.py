"""AWQ's weight clipping search: per group, the max |w| that minimises the group's output error once quantized."""

from __future__ import annotations

import torch

from lowbit.numerics.float_formats import FLOAT_TYPES, fake_quantize_blocks
from lowbit.numerics.float_quant import tensor_global_scale
from lowbit.numerics.grid import fake_quantize, fit_scale_zero, grouped
from lowbit.numerics.rtn import group_size_for
from lowbit.methods.base import WeightQuant


def _grouped(W: torch.Tensor, X: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> [out, n_groups, gs]; X [t, in] -> [t, n_groups, gs] (zero-padded to whole groups)."""
    return grouped(W, gs), grouped(X, gs)


def _quantize_groups(Wg: torch.Tensor, spec: WeightQuant, global_: torch.Tensor | None) -> torch.Tensor:
    """Wg [rows, g, gs] fake-quantized per group (a float grid's: NVFP4 relative to the tensor's ``global_``)."""
    if spec.float_type:
        return fake_quantize_blocks(Wg, Wg.abs().amax(dim=-1), FLOAT_TYPES[spec.float_type], global_)
    scale, zero = fit_scale_zero(Wg.amin(dim=-1), Wg.amax(dim=-1), spec.bits, spec.symmetric)
    return fake_quantize(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits)


def awq_clip(
    W: torch.Tensor, X: torch.Tensor, spec: WeightQuant, n_grid: int = 20, max_shrink: float = 0.5,
    row_batch: int = 1024, token_weights: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Best clipping threshold max_val [out, n_groups] for W [out, in] given sample inputs X [tokens, in].

    Candidates are max|w| * (1 - i / n_grid) for i < max_shrink * n_grid; the error of a group is the mean squared
    difference of its partial outputs X_g W_g^T before and after clip + quantization, over the tokens weighted by
    ``token_weights`` [tokens] where given (a stratified sample's: observers.TokenSampleObserver). Per-tensor grids
    have no per-group range to clip: None.
    """
    spec = spec.for_width(W.shape[1])  # a K-quant grid: searched on its sub-blocks' ranges (before sc is rounded)
    if spec.granularity == "tensor":
        return None
    gs = group_size_for(spec, W.shape[1])
    # NVFP4's tensor scale, from the unclipped weight (clipping moves it only where the largest group is clipped)
    global_ = tensor_global_scale(W.float(), FLOAT_TYPES[spec.float_type]) if spec.float_type else None
    best_rows = []
    for r0 in range(0, W.shape[0], row_batch):
        Wg, Xg = _grouped(W[r0 : r0 + row_batch].float(), X.float(), gs)  # [rows, g, gs], [t, g, gs]
        reference = torch.einsum("tgk,ogk->ogt", Xg, Wg)  # [rows, g, t]
        org_max = Wg.abs().amax(dim=-1)  # [rows, g]
        best_max = org_max.clone()
        best_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.clamp(Wg, -max_val.unsqueeze(-1), max_val.unsqueeze(-1))
            out = torch.einsum("tgk,ogk->ogt", Xg, _quantize_groups(clipped, spec, global_))
            err = _mean(out - reference, token_weights)  # [rows, g]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        best_rows.append(best_max)
    return torch.cat(best_rows, dim=0)


def _mean(difference: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """difference [rows, g, t] -> the (weighted) mean of its squares over the tokens [rows, g]."""
    if token_weights is None:
        return difference.pow(2).mean(dim=-1)
    w = token_weights.to(difference.device, difference.dtype)
    return difference.pow(2) @ (w / w.sum())


def apply_clip(W: torch.Tensor, max_val: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """Clamp W [out, in] to [-max_val, max_val] of each group (max_val [out, n_groups])."""
    gs = group_size_for(spec.for_width(W.shape[1]), W.shape[1])
    bound = max_val.repeat_interleave(gs, dim=1)[:, : W.shape[1]]  # [out, in]
    return torch.clamp(W, -bound, bound)
