"""Equivalence transforms on one block: SmoothQuant scales and AWQ scale + clip search.

Each runs the block once in full precision (the reference outputs the block's error is measured against), turns
the statistics into scales, folds them, and records the result in ``ctx.artifact`` so that a later run can
re-apply it (``saved``) without calibrating. Every fold goes through ``fold_proven``: kept only when the block's
float32 output is unchanged by it, recorded in ``ctx.folds`` either way (the artifact holds the scales searched,
whether or not their fold was kept; a re-applying run proves them again). AWQ's clip thresholds are recorded here
and applied when the weights are rounded (``compress``), so the clip is part of the measured rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.rtn import group_size_for, rtn
from lowbit.numerics.scales import awq_ratios, awq_scales, smoothquant_scales
from lowbit.numerics.awq_clip import awq_clip
from lowbit.pipeline.context import BlockContext, ResolvedGroup, resolve_groups
from lowbit.pipeline.fold import Probe, fold_scales, probe_from, prove_fold, snapshot
from lowbit.pipeline.observers import AbsMaxObserver, CallRecorder, MeanAbsObserver, TokenSampleObserver
from lowbit.pipeline.report import FoldRecord
from lowbit.pipeline.taps import replay, run_with_taps
from lowbit.recipe import AWQ, SmoothQuant, WeightQuant

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


def fold_proven(ctx: BlockContext, probe: Probe, g: ResolvedGroup, s: torch.Tensor | None, method: str) -> bool:
    """The one way SmoothQuant and AWQ fold: ``s`` into group ``g`` of ``ctx.block``, kept only if ``prove_fold``
    finds the block's float32 output on ``probe`` unchanged (else undone exactly, and the group's Linears are
    quantized unsmoothed). The attempt goes to ``ctx.folds``; returns whether the fold was kept. ``s`` is None
    exactly when the group cannot be folded at all (``g.blocker``)."""
    if g.blocker:
        applied, change, reason = False, math.nan, g.blocker
    else:
        assert s is not None
        proof = prove_fold(
            ctx.block, probe, lambda: fold_scales(g.prev, g.linears, s, ctx.arch.norm_offset, g.passengers),
            snapshot([g.prev, *g.linears, *g.passengers]),
        )
        applied, change = proof.holds, proof.change
        reason = "" if applied else (
            f"folding changed the block's float32 output by {change:.1e} of its scale (tolerance "
            f"{proof.tolerance:.0e}): the architecture table's entry does not describe this block (the op's norm "
            "offset, or the Linears it feeds)"
        )
    ctx.folds.append(FoldRecord(method, g.spec.prev, list(g.spec.linears), applied, change, reason))
    return applied


def smooth_block(ctx: BlockContext, step: SmoothQuant, saved: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
    """SmoothQuant on every norm -> Linears group (and Linear -> Linear pairs when the step asks); returns the
    block's full-precision outputs. All statistics come from one full-precision pass: folding preserves every
    Linear's output, so later groups' inputs are unchanged by earlier folds."""
    assert ctx.data is not None, "SmoothQuant runs with calibration data"
    groups = resolve_groups(ctx, norms_only=not step.fold_into_linears)
    observers = {g.spec.linears[0]: AbsMaxObserver() for g in groups if not g.blocker} if saved is None else {}
    reference = run_with_taps(
        ctx.block, ctx.data, {k: [v] for k, v in observers.items()}, max_outputs=ctx.error_batches
    )
    probe = probe_from(ctx.data)
    for g in groups:
        s = None
        if not g.blocker:
            name = ctx.full_name(f"{g.spec.prev}.{SMOOTH_KEY}")
            if saved is not None:
                s = saved_tensor(saved, name, (g.linears[0].in_features,))
            else:
                weight_absmax = torch.stack([lin.weight.abs().amax(dim=0) for lin in g.linears]).amax(dim=0)
                s = smoothquant_scales(observers[g.spec.linears[0]].absmax, weight_absmax, step.alpha)
            ctx.artifact[name] = s.cpu()
        fold_proven(ctx, probe, g, s, "smoothquant")
    return reference


@torch.no_grad()
def search_awq_scale(
    linears: list[torch.nn.Linear], x_mean: torch.Tensor, spec: WeightQuant, n_grid: int,
    run: Callable[[], list[torch.Tensor]],
) -> torch.Tensor:
    """AWQ grid search: the s = mean|x|^a (normalised) for which quantizing the Linears as Q(W s) / s changes the
    outputs of ``run`` (the inspected module replayed on recorded inputs) least. The weights are restored."""
    reference = run()
    originals = [lin.weight.detach().clone() for lin in linears]
    best_loss, best_s = math.inf, torch.ones_like(x_mean)
    try:
        for ratio in awq_ratios(n_grid):
            s = awq_scales(x_mean, ratio).to(originals[0].device)
            for lin, W in zip(linears, originals):
                lin.weight.copy_((rtn(W * s, spec).dequantize() / s).to(W.dtype))
            loss = sum(float((o - r).float().pow(2).sum()) for o, r in zip(run(), reference))
            if loss < best_loss:
                best_loss, best_s = loss, s
    finally:
        for lin, W in zip(linears, originals):
            lin.weight.copy_(W)
    return best_s


def awq_block(ctx: BlockContext, step: AWQ, batch_size: int, saved: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
    """AWQ scale search per group (folded at once, if proven), then clip search per Linear; returns fp outputs."""
    assert ctx.data is not None, "AWQ runs with calibration data"
    groups = resolve_groups(ctx)
    clip_paths = [p for p in ctx.targets if p not in ctx.arch.no_clip] if step.clip else []
    taps: dict[str, list] = {}
    recorders: dict[str, CallRecorder] = {}
    if saved is None:
        n_calls = max(1, math.ceil(step.replay_sequences / batch_size))
        for g in groups:
            if not g.blocker:
                taps.setdefault(g.spec.linears[0], []).append(MeanAbsObserver())
                recorders[g.inspect_path] = CallRecorder(n_calls)
        for path in clip_paths:
            taps.setdefault(path, []).append(TokenSampleObserver(step.clip_tokens, seed=ctx.seed))
    reference = run_with_taps(ctx.block, ctx.data, taps, recorders, max_outputs=ctx.error_batches)
    samples = {p: next(o for o in taps[p] if isinstance(o, TokenSampleObserver)) for p in clip_paths if p in taps}

    probe = probe_from(ctx.data)
    for g in groups:
        s = None
        if not g.blocker:
            name = ctx.full_name(f"{g.spec.prev}.{AWQ_SCALE_KEY}")
            if saved is not None:
                s = saved_tensor(saved, name, (g.linears[0].in_features,))
            else:
                x_mean = next(o for o in taps[g.spec.linears[0]] if isinstance(o, MeanAbsObserver)).mean
                module, calls = ctx.block.get_submodule(g.inspect_path), recorders[g.inspect_path].calls
                s = search_awq_scale(g.linears, x_mean, step.weights, step.n_grid, lambda: replay(module, calls))
            ctx.artifact[name] = s.cpu()
        if fold_proven(ctx, probe, g, s, "awq"):
            assert s is not None
            for path in g.spec.linears:  # these Linears now see x / s
                if path in samples and samples[path].rows is not None:
                    samples[path].rows = samples[path].rows / s.to(samples[path].rows.device)

    for path in clip_paths:
        name = ctx.full_name(f"{path}.{AWQ_CLIP_KEY}")
        if saved is not None:
            weight = ctx.targets[path].weight
            n_groups = -(-weight.shape[1] // group_size_for(step.weights, weight.shape[1]))
            # per-tensor grids have no clip, so the artifact may rightly lack this tensor
            max_val = saved_tensor(saved, name, (weight.shape[0], n_groups)) if name in saved else None
        else:
            rows = samples[path].rows
            assert rows is not None
            max_val = awq_clip(ctx.targets[path].weight.detach(), rows, step.weights, step.n_grid, step.max_shrink)
        if max_val is not None:
            ctx.artifact[name] = max_val.cpu()
    return reference
