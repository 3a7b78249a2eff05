"""AWQ (Lin et al. 2023): activation-aware per-channel scale search, folded where proven exact, then a per-Linear
clip search; the rounding itself is the recipe's rounding step (RTN on AWQ's grid when the recipe has none, under
the inputs' importance where the grid searches its fit: K-quant grids).

On a searched range ("mse", "imatrix-mse": numerics/range_search.py) each scale candidate is judged by the searched
grid's rounding (K grids and "llama" fits are judged by their unweighted fit, though rounded under the inputs'
importance: as before the searched ranges existed), "imatrix-mse" weighting each column of W s by its inputs' mean square over s^2 (the scaled
Linear's inputs are x / s), and the range search takes the clip search's place: both shrink each group's range,
and a clip searched for min-max rounding would be shrunk again by a search that did not see it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.distributed.divide import divide_work
from lowbit.distributed.ranks import SINGLE, Ranks
from lowbit.errors import LowbitError
from lowbit.numerics.grid import group_count
from lowbit.methods.base import TRANSFORM, Step, WeightQuant, check
from lowbit.methods.rtn import RTN
from lowbit.numerics.awq_clip import apply_clip, awq_clip
from lowbit.numerics.rtn import group_size_for, rtn
from lowbit.numerics.scales import awq_ratios, awq_scales
from lowbit.pipeline.context import BlockContext, resolve_groups
from lowbit.pipeline.fold import probe_from
from lowbit.pipeline.observers import CallRecorder, InputNormObserver, MeanAbsObserver, TokenSampleObserver
from lowbit.pipeline.taps import replay, run_with_taps
from lowbit.pipeline.transforms import AWQ_CLIP_KEY, AWQ_SCALE_KEY, agreed_scales, fold_proven, saved_tensor


def same_grid(a: WeightQuant, b: WeightQuant) -> bool:
    """Whether two grids round alike (a group size is irrelevant unless the granularity is per-group)."""
    def key(w: WeightQuant) -> tuple:
        return (w.bits, w.symmetric, w.granularity, w.group_size if w.granularity == "group" else None, w.ggml,
                w.fit, w.float_type)

    return key(a) == key(b)


@dataclass(frozen=True)
class AWQ(Step):
    """Per-channel mean|x|, grid search of s = mean|x|^a / sqrt(max min) over a in [0, 1) against the inspected
    sub-module's output, then a clip search per Linear. The search result is saved as ``transforms.safetensors`` in
    the output; ``artifact`` points a later run at it. ``replay_sequences`` bounds how many calibration sequences
    are replayed through each sub-module per grid point (the search cost); ``clip_tokens`` bounds the tokens the clip
    search draws at random; besides them it always sees the first ``clip_sink_positions`` positions of every
    calibration sequence, the attention sinks, each weighted by its share of the tokens (0: AutoAWQ's uniform sample
    alone). A uniform sample holds about one sink, and without them the search clipped the weights that write the
    sinks' massive activation as if nothing went through them (Qwen2.5: that block's output error 3.7x the unclipped
    one's; docs/peers.md).
    """

    kind: ClassVar[str] = "awq"
    stage: ClassVar[int] = TRANSFORM
    predates: ClassVar[dict[str, Any]] = {"clip_sink_positions": 0}  # outputs before stop 43 sampled uniformly
    weights: WeightQuant = field(default_factory=WeightQuant)
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    replay_sequences: int = 16
    clip_tokens: int = 512
    clip_sink_positions: int = 1
    artifact: str | None = None  # re-apply scales/clips saved by an earlier run instead of searching

    def check(self) -> None:
        check(self.n_grid >= 1, f"awq n_grid must be >= 1, got {self.n_grid}")
        check(0.0 <= self.max_shrink < 1.0, f"awq max_shrink must be in [0, 1), got {self.max_shrink}")
        check(self.replay_sequences >= 1, "awq replay_sequences must be >= 1")
        check(self.clip_tokens >= 1, "awq clip_tokens must be >= 1")
        check(self.clip_sink_positions >= 0, f"awq clip_sink_positions must be >= 0, got {self.clip_sink_positions}")

    def check_recipe(self, recipe) -> None:  # noqa: ANN001 (Recipe: imported lazily, it imports the registry)
        rounding = next((s for s in recipe.steps if s.rounds), None)
        if rounding is not None and rounding.grid is not None:
            # AWQ searches its scales and clips on its own grid: rounding on another one would apply g128 clips
            # to a g32 rounding, a search result for weights that are never produced
            check(
                same_grid(self.weights, rounding.grid),
                f"awq searches on {self.weights.label} but {rounding.kind} rounds on {rounding.grid.label}: one grid "
                "per recipe",
                "give awq the same weights as the rounding step",
            )

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def searches_clip(self) -> bool:
        """Whether AWQ's own clip search runs: not on a searched range, whose search at rounding is the clip."""
        return self.clip and not self.weights.searched

    def implied_rounding(self) -> RTN:
        # a grid that searches its fit (K types, "llama") does so under the inputs' importance, as llama-quantize
        # --imatrix does: AWQ calibrates anyway, and it lowers llama.cpp's perplexity of the file (docs/kquants.md)
        return RTN(self.weights, importance=self.weights.fit == "llama")

    def transform_block(
        self, ctx: BlockContext, batch_size: int, saved: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor]:
        return awq_block(ctx, self, batch_size, saved)

    def adjust_weight(self, ctx: BlockContext, path: str, weight: torch.Tensor) -> torch.Tensor:
        """The searched clip, applied where the weights are rounded, so it is part of the measured error."""
        clip = ctx.artifact.get(ctx.full_name(f"{path}.{AWQ_CLIP_KEY}"))
        return weight if clip is None else apply_clip(weight, clip.to(weight.device), self.weights)


@torch.no_grad()
def search_awq_scale(
    linears: list[torch.nn.Linear], x_mean: torch.Tensor, spec: WeightQuant | list[WeightQuant], n_grid: int,
    run: Callable[[], list[torch.Tensor]], ranks: Ranks = SINGLE, x_sumsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """AWQ grid search: the s = mean|x|^a (normalised) for which quantizing the Linears as Q(W s) / s changes the
    outputs of ``run`` (the inspected module replayed on recorded inputs) least. ``spec``: one grid for all, or each
    Linear's own (a llama.cpp mix gives v_proj more bits than q_proj). A grid whose range search weighs its columns
    by their inputs ("imatrix-mse") is fitted under ``x_sumsq`` [in] (sum of x_j^2) / s^2, the importance of W s's
    columns. The weights are restored. On several ranks each replays its own recorded calls and the losses are
    summed over ranks."""
    grids = spec if isinstance(spec, list) else [spec] * len(linears)
    reference = run()
    originals = [lin.weight.detach().clone() for lin in linears]
    best_loss, best_s = math.inf, torch.ones_like(x_mean)
    try:
        for ratio in awq_ratios(n_grid):
            s = awq_scales(x_mean, ratio).to(originals[0].device)
            scaled_sumsq = None if x_sumsq is None else x_sumsq.to(s.device) / s.pow(2)  # [in]: W s's inputs x / s
            for lin, W, grid in zip(linears, originals, grids):
                assert scaled_sumsq is not None or not grid.weighs_inputs, "a weighted search needs the inputs' sumsq"
                importance = scaled_sumsq if grid.weighs_inputs else None
                lin.weight.copy_((rtn(W * s, grid, importance).dequantize() / s).to(W.dtype))
            local = sum(float((o - r).float().pow(2).sum()) for o, r in zip(run(), reference))
            loss = ranks.sum_floats([local])[0]  # one process: the local loss itself
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
    clip_paths = [p for p in ctx.targets if p not in ctx.arch.no_clip] if step.searches_clip else []
    taps: dict[str, list] = {}
    recorders: dict[str, CallRecorder] = {}
    if saved is None:
        n_calls = max(1, math.ceil(step.replay_sequences / batch_size))
        for g in groups:
            if not g.blocker:
                taps.setdefault(g.spec.linears[0], []).append(MeanAbsObserver())
                if step.weights.weighs_inputs:
                    taps[g.spec.linears[0]].append(InputNormObserver())
                recorders[g.inspect_path] = CallRecorder(n_calls)
        for path in clip_paths:
            taps.setdefault(path, []).append(TokenSampleObserver(step.clip_tokens, ctx.seed, step.clip_sink_positions))
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
                observers = taps[g.spec.linears[0]]
                x_mean = next(o for o in observers if isinstance(o, MeanAbsObserver)).mean
                x_sumsq = next((o.sumsq for o in observers if isinstance(o, InputNormObserver)), None)
                module, calls = ctx.block.get_submodule(g.inspect_path), recorders[g.inspect_path].calls
                s = agreed_scales(ctx, search_awq_scale(
                    g.linears, x_mean, [ctx.linear_grid(p, step.weights) for p in g.spec.linears], step.n_grid,
                    lambda: replay(module, calls), ctx.ranks, x_sumsq,
                ))
            ctx.artifact[name] = s.cpu()
        if fold_proven(ctx, probe, g, s, "awq"):
            assert s is not None
            for path in g.spec.linears:  # these Linears now see x / s
                if path in samples and samples[path].rows is not None:
                    samples[path].rows = samples[path].rows / s.to(samples[path].rows.device)

    def search_clip(path: str) -> torch.Tensor | None:
        rows = samples[path].rows
        assert rows is not None
        grid = ctx.linear_grid(path, step.weights)  # a llama.cpp mix's type for this Linear
        weights = samples[path].weights if step.clip_sink_positions else None  # none: AutoAWQ's plain mean
        return awq_clip(ctx.targets[path].weight.detach(), rows, grid, step.n_grid, step.max_shrink,
                        token_weights=weights)

    if saved is None:  # each rank searches its share of the Linears (distributed/divide.py)
        clips = divide_work(ctx.ranks, clip_paths, lambda p: ctx.targets[p].weight.numel(), search_clip)
    else:
        check_saved_clips(ctx, step, saved)
    for path in clip_paths:
        name = ctx.full_name(f"{path}.{AWQ_CLIP_KEY}")
        if saved is not None:
            weight = ctx.targets[path].weight
            grid = ctx.linear_grid(path, step.weights).for_width(weight.shape[1])
            n_groups = group_count(weight.shape[1], group_size_for(grid, weight.shape[1]))
            # per-tensor grids have no clip; every other grid's clip was searched and saved
            per_tensor = grid.granularity == "tensor"
            max_val = None if per_tensor else saved_tensor(saved, name, (weight.shape[0], n_groups))
        else:
            max_val = clips[path]
        if max_val is not None:
            ctx.artifact[name] = max_val.cpu()
    return reference


def check_saved_clips(ctx: BlockContext, step: AWQ, saved: dict[str, torch.Tensor]) -> None:
    """Saved clips re-applied only where this step searches clips: clips searched for min-max rounding would be
    shrunk again by a searched range (a recipe without clips re-applying them is refused per tensor, above)."""
    if step.searches_clip or not step.clip:
        return
    held = [p for p in ctx.targets if ctx.full_name(f"{p}.{AWQ_CLIP_KEY}") in saved]
    if held:
        raise LowbitError(
            f"the saved transforms hold AWQ clips (e.g. {ctx.full_name(held[0])}) searched for min-max rounding, but "
            f"this recipe's grid searches each group's range ({step.weights.label}); search again without "
            "--transforms, or re-apply them to the min-max grid they were searched for"
        )
