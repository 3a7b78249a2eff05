"""Rotate: QuaRot's offline rotation of the residual stream (Ashkboos et al. 2024), before any other step.

Every block's reads and writes of the residual stream, the embedding and the head are rotated by one orthogonal
matrix (numerics/rotation.py: a randomized Hadamard-Kronecker matrix seeded by ``seed``), folded into the weights
(pipeline/rotate.py); the model computes the same function, but the massive activation channels that `lowbit
outliers` finds in the stream are spread over all channels, so per-token activation grids (W4A8, W4A4) and weight
grids lose less to them. Each block's rotation is proven on calibration sequences; a block it does not hold for ends
the run in one line (half a model cannot be rotated). Online rotations (QuaRot's Hadamard before down_proj) are not
part of it unless ``online``: without it the rotated model is an ordinary one of its architecture, which every
format holds. With ``online`` the Linears writing to the stream (o_proj, down_proj: their inputs are no residual stream,
down_proj's is act(gate) * up, which no weight can rotate) also rotate their inputs at run time (runtime/
rotated_input.py), their weights compressed as W Q under Q^T H Q: QuaRot's online Hadamard, what W4A4 needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import ROTATE, Step, check
from lowbit.numerics.rotation import residual_rotation
from lowbit.pipeline.context import BlockContext
from lowbit.pipeline.fold import probe_from, snapshot
from lowbit.pipeline.report import FoldRecord
from lowbit.pipeline.transforms import proven_on_rank0
from lowbit.pipeline.rotate import (
    ROTATION_MARK, OutsideRotation, outside_rotation, prove_rotation, residual_layout,
    rotate_block,
)

if TYPE_CHECKING:
    from lowbit.models.arch import Arch
    from lowbit.recipe import Recipe


@dataclass(frozen=True)
class Rotate(Step):
    """Rotate the residual stream by ``residual_rotation(width, seed)``, folded into the weights; first in a recipe."""

    kind: ClassVar[str] = "rotate"
    stage: ClassVar[int] = ROTATE
    seed: int = 0
    online: bool = False  # also rotate the inputs of the Linears writing to the stream at run time

    def check(self) -> None:
        check(self.seed >= 0, f"rotate seed must be >= 0, got {self.seed}")

    def check_recipe(self, recipe: Recipe) -> None:
        check(not recipe.quantizes_outside_blocks, "rotate folds the final norm into the head and rotates the "
              "embedding; quantizing them too is not supported", "drop the recipe's 'embeddings'/'head' grids")
        check(recipe.budget is None and not recipe.plan, "a budget's plan is measured on the unrotated model",
              "drop the budget, or the rotate step")
        if self.online:
            self._check_online(recipe)

    def _check_online(self, recipe: Recipe) -> None:
        """Online rotations hand the compression W Q and Q^T H Q; what else a step reads of the inputs (norms,
        ranges, the block's float outputs, searched scales) would be in the other basis."""
        fix = "drop \"online\" (or the step)"
        others = [s.kind for s in recipe.block_transforms if s is not self]
        check(not others, f"online rotations are not combined with {others}: their scales are searched on the "
              "unrotated inputs", fix)
        needs = recipe.needs()
        check(not (needs.input_norm or needs.input_absmax or needs.float_targets or recipe.prunes),
              "online rotations work with RTN or GPTQ and dynamic activation quantization; this recipe reads input "
              "norms or ranges, prunes or tunes against the float block", fix)
        grid = recipe.weight_step.grid if recipe.weight_step is not None else None
        check(grid is None or not (grid.ggml or grid.float_type), f"online rotations are for integer grids, got "
              f"{grid.label if grid is not None else ''}", fix)

    @property
    def label(self) -> str:
        return "rotate online" if self.online else "rotate"

    def check_export(self, fmt: str) -> None:
        if self.online:
            raise LowbitError(f"{fmt} has no way to say that o_proj / down_proj rotate their inputs at run time (an "
                              "online rotation); quantize with an offline rotation only (rotate-, not quarot-) to export")

    @property
    def needs_calibration(self) -> bool:
        return True  # every block's rotation is proven on calibration sequences

    def outside(self, model: nn.Module, arch: Arch, tied: bool) -> OutsideRotation:
        """The rotation of the embedding, final norm and head; before any work, every block's structure is checked
        (a skeleton on meta is enough): a model it cannot rotate is refused here, not at its first block."""
        width = model.get_input_embeddings().weight.shape[1]
        blocks = model.get_submodule(arch.blocks)
        for block in blocks if arch.per_block else blocks[:1]:
            residual_layout(block, arch, width, model.config.model_type)
        return outside_rotation(model, arch, residual_rotation(width, self.seed), tied)

    def transform_block(
        self, ctx: BlockContext, batch_size: int, saved: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        """Rotate the block (its inputs are already rotated: the embedding was); the reference outputs are the
        next transform's or the reference pass's."""
        assert ctx.data is not None, "rotate runs with calibration data"
        width = ctx.data.hidden[0].shape[-1]
        q = residual_rotation(width, self.seed)
        layout = residual_layout(ctx.block, ctx.arch, width, ctx.model_type)
        touched = [ctx.block.get_submodule(p) for _, ls, ps in layout.readers for p in ls + ps] + \
            [ctx.block.get_submodule(n) for n, _, _ in layout.readers] + [ctx.block.get_submodule(p) for p in layout.writers]

        def apply() -> None:
            rotate_block(ctx.block, layout, q, ctx.arch.norm_offset)

        proof = proven_on_rank0(ctx, lambda: prove_rotation(ctx.block, probe_from(ctx.data), q, apply,
                                                             snapshot(touched)), apply)
        ctx.folds.append(FoldRecord("rotate", "residual stream", [p for _, ls, _ in layout.readers for p in ls]
                                    + list(layout.writers), proof.holds, proof.change, ""))
        if not proof.holds:
            change = "a non-finite output" if math.isnan(proof.change) else f"{proof.change:.1e} of its scale"
            suspects = f" (norms on Linear outputs: {', '.join(layout.others)})" if layout.others else ""
            raise LowbitError(
                f"{ctx.prefix}: rotating the residual stream changed the block's float32 output by {change} "
                f"(tolerance {proof.tolerance:.0e}): this block does not compute the same function on a rotated "
                f"stream{suspects}; quantize without the rotate step"
            )
        if self.online:
            ctx.online.update({p: self.seed for p in layout.writers if p in ctx.targets})
        ctx.artifact[ROTATION_MARK] = torch.tensor([self.seed])  # scales searched after it hold in this basis only
        return None
