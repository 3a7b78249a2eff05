"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a), folded
into the op before each group of Linears (every fold proven on the block's output: pipeline/transforms.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.methods.base import TRANSFORM, Step, check
from lowbit.numerics.scales import smoothquant_scales
from lowbit.pipeline.context import BlockContext, resolve_groups
from lowbit.pipeline.fold import probe_from
from lowbit.pipeline.observers import AbsMaxObserver
from lowbit.pipeline.taps import run_with_taps
from lowbit.pipeline.transforms import SMOOTH_KEY, agreed_scales, fold_proven, saved_tensor


@dataclass(frozen=True)
class SmoothQuant(Step):
    """The paper folds into the norms before the attention and MLP inputs only. ``fold_into_linears`` also smooths
    the inputs whose previous op is a Linear (up_proj -> down_proj, fc1 -> fc2, v_proj -> o_proj where the shapes
    allow): on models whose largest outliers sit at down_proj's input (SmolLM2-135M: up to 1800x the median
    channel, see `lowbit outliers`), norm-only smoothing cannot reach them.
    """

    kind: ClassVar[str] = "smoothquant"
    stage: ClassVar[int] = TRANSFORM
    alpha: float = 0.5
    fold_into_linears: bool = False
    artifact: str | None = None  # re-apply scales saved by an earlier run instead of calibrating

    def check(self) -> None:
        check(0.0 <= self.alpha <= 1.0, f"smoothquant alpha must be in [0, 1], got {self.alpha}")

    @property
    def needs_calibration(self) -> bool:
        return True

    def transform_block(
        self, ctx: BlockContext, batch_size: int, saved: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor]:
        return smooth_block(ctx, self, saved)


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
                s = agreed_scales(ctx, s)
            ctx.artifact[name] = s.cpu()
        fold_proven(ctx, probe, g, s, "smoothquant")
    return reference


