"""What the per-block algorithms work on: one materialised block, its calibration inputs, its table entry."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.arch import Arch, ScaleGroup, block_linears, get_submodule
from lowbit.pipeline.fold import can_fold
from lowbit.pipeline.taps import BlockData


@dataclass
class BlockContext:
    prefix: str  # the block's path in the model, e.g. "model.layers.3"
    block: nn.Module
    data: BlockData | None  # None when a data-free recipe runs without calibration
    arch: Arch
    model_type: str
    targets: dict[str, nn.Linear]  # Linears to compress, by path inside the block
    artifact: dict[str, torch.Tensor] = field(default_factory=dict)  # transform results, by full tensor name
    seed: int = 0
    error_batches: int = 4  # batches whose full-precision outputs are kept to measure the block's error

    def full_name(self, path: str) -> str:
        return f"{self.prefix}.{path}"


@dataclass(frozen=True)
class ResolvedGroup:
    spec: ScaleGroup
    prev: nn.Module
    linears: list[nn.Linear]

    @property
    def inspect_path(self) -> str:
        return self.spec.inspect or self.spec.linears[0]


def select_targets(block: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every Linear of the block except those whose full name matches an ignore pattern (fnmatch)."""
    return {
        path: lin
        for path, lin in block_linears(block).items()
        if not any(fnmatch.fnmatch(f"{prefix}.{path}", pat) or fnmatch.fnmatch(path, pat) for pat in ignore)
    }


def resolve_groups(ctx: BlockContext, norms_only: bool = False) -> list[ResolvedGroup]:
    """The architecture's scale groups as modules; optional groups whose shapes forbid folding are skipped."""
    groups = []
    for spec in ctx.arch.groups:
        prev = get_submodule(ctx.block, spec.prev, ctx.model_type)
        if norms_only and isinstance(prev, nn.Linear):
            continue
        linears = [get_submodule(ctx.block, p, ctx.model_type) for p in spec.linears]
        if not can_fold(prev, linears):  # type: ignore[arg-type]
            if spec.optional:
                continue
            raise LowbitError(f"model type {ctx.model_type!r}: {spec.prev} cannot absorb the scales of {spec.linears}")
        groups.append(ResolvedGroup(spec, prev, linears))  # type: ignore[arg-type]
    return groups
