"""Per-input-channel scales for the equivalence transform Y = (X diag(s)^-1)(diag(s) W^T).

SmoothQuant picks s to move activation outliers into the weights; AWQ searches s to give the weights that see
large activations more of the grid. Both are folded into the previous op, so they cost nothing at run time.
"""

from __future__ import annotations

import torch

_EPS = 1e-5


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), both [in]; channels that never fire keep s = 1."""
    a = act_absmax.float().clamp(min=_EPS)
    w = weight_absmax.float().clamp(min=_EPS)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=_EPS)


def awq_scales(act_mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's grid candidate: s = mean|X|^ratio normalised by sqrt(max(s) * min(s)), [in]."""
    s = act_mean_abs.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_ratios(n_grid: int) -> list[float]:
    """The grid a in {0, 1/n, ..., (n-1)/n} that AWQ searches."""
    return [i / n_grid for i in range(n_grid)]
