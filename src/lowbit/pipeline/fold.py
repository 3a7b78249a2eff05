"""Fold per-channel scales into a block: the previous op's output is divided by s, the next Linears' input
columns are multiplied by s. The block computes the same function (up to float rounding) afterwards."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError


def can_fold(prev: nn.Module, linears: list[nn.Linear]) -> bool:
    """Shapes allow folding: prev's output width equals every Linear's input width."""
    width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
    return all(lin.in_features == width for lin in linears)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """prev(x) / s and W[:, j] * s_j for each Linear. ``prev`` is a Linear (its rows scale) or a norm with a
    weight (and optionally a bias); ``norm_offset`` = 1 for norms computing (1 + weight) * x_hat (Gemma)."""
    if not can_fold(prev, linears):
        raise LowbitError(f"cannot fold scales: {type(prev).__name__} output width does not match the next Linears")
    s = s.to(linears[0].weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))  # W_prev [out = len(s), in]: rows
    elif getattr(prev, "weight", None) is not None:
        weight = prev.weight.float()
        prev.weight.copy_(((weight + norm_offset) / s - norm_offset).to(prev.weight.dtype))
    else:
        raise LowbitError(f"cannot fold scales into {type(prev).__name__}: it has no weight to absorb them")
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))  # W [out, in]: columns
