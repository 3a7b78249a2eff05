"""Salient weights the AWQ way (AWQ paper, Table 1): the weight columns that multiply the largest activation
channels matter more than their own magnitude says. Keeping 1% of columns in float helps only if they are
chosen by activation, not at random; this measures that on a real Linear's inputs.
"""

from __future__ import annotations

import torch

from lowbit.numerics.rtn import rtn
from lowbit.methods.base import WeightQuant


def salient_columns(act_mean_abs: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the top ``share`` of input channels by mean |x| [in] (at least one)."""
    k = max(1, round(share * act_mean_abs.numel()))
    return torch.topk(act_mean_abs.float(), k).indices


def kept_column_errors(
    W: torch.Tensor, X: torch.Tensor, act_mean_abs: torch.Tensor, spec: WeightQuant, share: float = 0.01, seed: int = 0
) -> dict[str, float]:
    """Relative output error ||X W_hat^T - X W^T|| / ||X W^T|| for W [out, in] on inputs X [tokens, in] when every
    column is quantized with ``spec``, when the salient ``share`` of columns keeps its float values, and when the
    same number of random columns does."""
    W, X = W.float(), X.float().to(W.device)
    W_hat = rtn(W, spec).dequantize().to(W.device)
    Y = X @ W.T  # [tokens, out]
    reference = float(Y.norm()) or 1.0
    salient = salient_columns(act_mean_abs, share).to(W.device)
    generator = torch.Generator().manual_seed(seed)
    random = torch.randperm(W.shape[1], generator=generator)[: salient.numel()].to(W.device)

    def error(keep: torch.Tensor | None) -> float:
        mixed = W_hat.clone()
        if keep is not None:
            mixed[:, keep] = W[:, keep]
        return float((X @ mixed.T - Y).norm()) / reference

    return {"quantized": error(None), "salient_kept": error(salient), "random_kept": error(random)}
