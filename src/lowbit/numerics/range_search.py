"""Range search: per group, the clipped range whose grid rounds the group with the least (weighted) error.

A min-max grid spends its levels on the group's extremes; shrinking the range to p * [min, max] rounds the bulk
finer and clips the few largest weights. The search tries evenly spaced p and keeps, per group, the one minimising
sum_k c_k |q(w_k) - w_k| ** norm, with c_k the column's importance (its inputs' mean square: llama.cpp's importance
matrix, GPTQ's Hessian diagonal) or 1. The searches are llm-compressor's two observers, their defaults as published:
"mse" (p from 1.00 down to 0.81 in steps of 0.01, norm 2.4) and "imatrix_mse" (p from 1.00 down to 0.05 in steps
of 0.05, norm 3, each column weighted by E[x_j^2]). Unlike theirs, the search never stops early: its result does
not depend on how many groups a tensor has. Each candidate's scale is the stored (float16) one, so the error
searched is the error served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.numerics.grid import fake_quantize, fit_scale_zero


@dataclass(frozen=True)
class RangeSearch:
    step: float  # p = 1 - i * step for i < candidates
    candidates: int
    norm: float  # the error's exponent: 2 is MSE; larger weighs the biggest rounding errors more
    weighted: bool  # whether each column's error counts by its importance

    def shrinks(self) -> list[float]:
        return [1.0 - i * self.step for i in range(self.candidates)]


SEARCHES = {
    "mse": RangeSearch(step=0.01, candidates=20, norm=2.4, weighted=False),
    "imatrix-mse": RangeSearch(step=0.05, candidates=20, norm=3.0, weighted=True),
}
ROW_BATCH = 1024  # rows searched at once: bounds the [rows, n_groups, group] temporaries of a wide Linear


def searched_scale_zero(
    Wg: torch.Tensor, bits: int, symmetric: bool, search: RangeSearch, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [rows, n_groups] (float32) of the best shrunk range of each group of Wg [rows, n_groups, gs]
    (float32), each column's error weighted by ``importance`` [n_groups, gs] (zero on padding; [1, rows * gs] for
    one group per tensor) where the search is weighted."""
    assert importance is not None or not search.weighted, "a weighted search needs each column's importance"
    weight = importance.float() if search.weighted and importance is not None else None
    scales, zeros = [], []
    for r0 in range(0, Wg.shape[0], ROW_BATCH):
        rows = Wg[r0 : r0 + ROW_BATCH]
        wmin, wmax = rows.amin(dim=-1), rows.amax(dim=-1)  # [rows, n_groups]

        def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:  # [rows, n_groups]
            err = (fake_quantize(rows, scale.unsqueeze(-1), zero.unsqueeze(-1), bits) - rows).abs_().pow_(search.norm)
            return (err.mul_(weight) if weight is not None else err).sum(dim=-1)

        # the full range first: on a tie a group keeps it
        best_scale, best_zero = fit_scale_zero(wmin, wmax, bits, symmetric)
        best_err = error(best_scale, best_zero)
        for p in search.shrinks()[1:]:
            scale, zero = fit_scale_zero(p * wmin, p * wmax, bits, symmetric)
            err = error(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        scales.append(best_scale)
        zeros.append(best_zero)
    return torch.cat(scales), torch.cat(zeros)
