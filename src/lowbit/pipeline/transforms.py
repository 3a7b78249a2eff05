"""What the equivalence transforms (methods/smoothquant.py, methods/awq.py) share: folding proven scales, and
re-applying an earlier run's artifact.

Each transform runs the block once in full precision (the reference outputs the block's error is measured
against), turns the statistics into scales, folds them, and records the result in ``ctx.artifact`` so that a later
run can re-apply it (``saved``) without calibrating. Every fold goes through ``fold_proven``: kept only when the
block's float32 output is unchanged by it, recorded in ``ctx.folds`` either way (the artifact holds the scales
searched, whether or not their fold was kept; a re-applying run proves them again).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.pipeline.context import BlockContext, ResolvedGroup
from lowbit.pipeline.fold import FoldProof, Probe, float32_parameters, fold_scales, prove_fold, snapshot
from lowbit.pipeline.report import FoldRecord

SMOOTH_KEY = "smooth_scales"
AWQ_SCALE_KEY = "awq_scales"
AWQ_CLIP_KEY = "awq_clip"


def saved_tensor(saved: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of an earlier run's artifact, checked to fit this model (an artifact of another model must not fold)."""
    if name not in saved:
        raise LowbitError(f"the transform artifact has no tensor {name!r}; it was made for another model or recipe")
    if tuple(saved[name].shape) != shape:
        raise LowbitError(
            f"the transform artifact's {name!r} has shape {tuple(saved[name].shape)}, this model needs {shape}; "
            "it was made for another model"
        )
    return saved[name]


def agreed_scales(ctx: BlockContext, s: torch.Tensor) -> torch.Tensor:
    """Rank 0's scales on every rank: each rank computed them from the same reduced statistics, but a pow or a sum
    on another CPU or GPU may round differently in the last bit, and the ranks must fold identical values."""
    return ctx.ranks.broadcast(s, src=0)  # one process: ``s`` itself


def proven_on_rank0(ctx: BlockContext, prove: Callable[[], FoldProof], apply: Callable[[], None]) -> FoldProof:
    """``prove()`` (which applies the change, or undoes it when it fails) on one process or rank 0, whose probe is
    global batch 0's as in one process; the other ranks get its proof and, where it holds, ``apply`` the change as
    rank 0 did (in float32, then narrowed back)."""
    ranks = ctx.ranks
    proof = prove() if ranks.writes else None
    proof = ranks.broadcast(proof, src=0)
    if not ranks.writes and proof.holds:
        with float32_parameters(ctx.block):
            apply()
    return proof


def fold_proven(ctx: BlockContext, probe: Probe, g: ResolvedGroup, s: torch.Tensor | None, method: str) -> bool:
    """The one way SmoothQuant and AWQ fold: ``s`` into group ``g`` of ``ctx.block``, kept only if ``prove_fold``
    finds the block's float32 output on ``probe`` unchanged (else undone exactly, and the group's Linears are
    quantized unsmoothed). The attempt goes to ``ctx.folds``; returns whether the fold was kept. ``s`` is None
    exactly when the group cannot be folded at all (``g.blocker``). On several ranks rank 0 proves the fold and
    the others follow its decision."""
    if g.blocker:
        applied, change, reason = False, math.nan, g.blocker
    else:
        assert s is not None

        def fold() -> None:
            fold_scales(g.prev, g.linears, s, ctx.arch.norm_offset, g.passengers)

        proof = proven_on_rank0(
            ctx, lambda: prove_fold(ctx.block, probe, fold, snapshot([g.prev, *g.linears, *g.passengers])), fold
        )
        applied, change = proof.holds, proof.change
        reason = "" if applied else (
            f"folding changed the block's float32 output by {change:.1e} of its scale (tolerance "
            f"{proof.tolerance:.0e}): the architecture table's entry does not describe this block (the op's norm "
            "offset, or the Linears it feeds)"
        )
    ctx.folds.append(FoldRecord(method, g.spec.prev, list(g.spec.linears), applied, change, reason))
    return applied
