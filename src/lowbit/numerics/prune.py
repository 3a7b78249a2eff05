"""Pruning masks from importance scores: magnitude |W| and Wanda |W_ij| * ||X_j||_2.

Masks are boolean with True = pruned. Unstructured Wanda compares scores within each output row (the paper's
per-output comparison group); magnitude uses one threshold per matrix (the classic baseline). N:M keeps exactly
N weights in every M consecutive inputs of a row.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    return W.abs().float()


def wanda_scores(W: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| [out, in] times the L2 norm of each input feature over the calibration tokens, input_norm [in]."""
    return W.abs().float() * input_norm.float().unsqueeze(0)


def prune_mask(scores: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """bool [out, in], True where the lowest-scoring weights are removed."""
    out_features, n = scores.shape
    if nm is not None:
        kept, group = nm
        if n % group != 0:
            raise LowbitError(f"N:M pruning needs in_features divisible by M={group}, got {n}")
        grouped = scores.view(out_features, n // group, group)  # [out, n/M, M]
        drop = torch.topk(grouped, group - kept, dim=-1, largest=False).indices
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.view(out_features, n)
    assert sparsity is not None
    if per_row:
        k = int(n * sparsity)
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)
    k = int(scores.numel() * sparsity)
    order = torch.argsort(scores.flatten())
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask.view_as(scores)


def nm_violations(W: torch.Tensor, kept: int, group: int) -> int:
    """How many M-groups of W's rows hold more than N non-zeros (0 for a valid N:M weight)."""
    out_features, n = W.shape
    nonzero = (W.view(out_features, n // group, group) != 0).sum(dim=-1)
    return int((nonzero > kept).sum())
