"""What the per-block algorithms work on: one materialised block, its calibration inputs, its table entry."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.distributed.ranks import SINGLE, Ranks
from lowbit.errors import LowbitError
from lowbit.methods.base import WeightQuant
from lowbit.models.arch import Arch, ScaleGroup, block_linears, get_submodule
from lowbit.numerics.bit_budget import plan_bits
from lowbit.numerics.kquant_mix import LinearPlace
from lowbit.pipeline.fold import fold_blocker
from lowbit.pipeline.report import FoldRecord
from lowbit.pipeline.taps import BlockData

if TYPE_CHECKING:
    from lowbit.recipe import Recipe


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
    folds: list[FoldRecord] = field(default_factory=list)  # every scale fold tried on this block, kept or refused
    ranks: Ranks = SINGLE  # the run's processes (per-Linear work is divided among them)
    layer: int = 0  # this block's index among the model's n_layers blocks (llama.cpp's mixes choose by it)
    n_layers: int = 1
    n_gqa: int = 1  # query heads per key/value head (the Q2_K mixes choose attn_v's type by it)
    plan: dict[str, WeightQuant] = field(default_factory=dict)  # a grid per Linear by full name (Recipe.plan)
    # Linears (paths in the block) whose inputs are rotated at run time, with the rotation's seed: their weight is
    # compressed as W Q and their runtime module rotates its input (runtime/rotated_input.py; methods/rotate.py)
    online: dict[str, int] = field(default_factory=dict)

    def full_name(self, path: str) -> str:
        return f"{self.prefix}.{path}"

    def linear_grid(self, path: str, grid: WeightQuant) -> WeightQuant:
        """The grid the Linear at ``path`` is rounded on: the recipe plan's for it, a llama.cpp mix's type for it, or
        ``grid``."""
        planned = self.plan.get(self.full_name(path))
        if planned is not None:
            return planned
        return grid.for_linear(LinearPlace(path, self.layer, self.n_layers, self.n_gqa))


@dataclass(frozen=True)
class ResolvedGroup:
    spec: ScaleGroup
    prev: nn.Module
    linears: list[nn.Linear]
    blocker: str = ""  # why this group cannot be folded at all (e.g. a norm without a weight); "" when it can
    passengers: list[nn.Module] = field(default_factory=list)  # float modules reading the same input (routers)

    @property
    def inspect_path(self) -> str:
        return self.spec.inspect or self.spec.linears[0]


def select_targets(block: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every Linear of the block except those whose full name matches an ignore pattern (fnmatch)."""
    return {
        path: lin
        for path, lin in block_linears(block).items()
        if not any(_ignored(f"{prefix}.{path}", path, pat) for pat in ignore)
    }


def _ignored(full_name: str, path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(full_name, pattern) or fnmatch.fnmatch(path, pattern)


def check_ignore_leaves_work(blocks: nn.ModuleList, blocks_path: str, ignore: tuple[str, ...]) -> None:
    """Refuse, before any work, ignore patterns that leave no Linear of any block to compress (``["*"]``): the run
    would write an uncompressed copy of the model and call it quantized. Names the patterns that matched."""
    names = [(f"{blocks_path}.{i}.{path}", path) for i, block in enumerate(blocks) for path in block_linears(block)]
    if not names or not all(any(_ignored(full, path, pat) for pat in ignore) for full, path in names):
        return
    every = [pat for pat in ignore if all(_ignored(full, path, pat) for full, path in names)]
    culprits = every or [pat for pat in ignore if any(_ignored(full, path, pat) for full, path in names)]
    raise LowbitError(
        f"the recipe's ignore pattern{'s' if len(culprits) > 1 else ''} {', '.join(map(repr, culprits))} "
        f"{'match' if len(culprits) > 1 else 'matches'} {'' if every else 'together '}all {len(names)} Linears of "
        "the decoder blocks, leaving nothing to quantize; narrow the recipe's 'ignore' list (e.g. [\"lm_head\"])"
    )


def named_targets(blocks: nn.ModuleList, blocks_path: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every block's Linears the recipe compresses (``select_targets``), by full name ("model.layers.3.mlp.up_proj")."""
    return {f"{blocks_path}.{i}.{path}": linear for i, block in enumerate(blocks)
            for path, linear in select_targets(block, f"{blocks_path}.{i}", ignore).items()}


def check_plan(blocks: nn.ModuleList, blocks_path: str, recipe: Recipe) -> None:
    """Refuse, before any work, a plan whose grids would not do what the recipe says: one naming a Linear the recipe
    does not compress here (another model's plan, a typo, an ignored Linear: its grid would silently not apply) or,
    under a budget, one that leaves a Linear out or stores more than the budget (a stored recipe edited)."""
    if not recipe.plan:
        return
    targets = named_targets(blocks, blocks_path, recipe.ignore)  # shapes only: a meta-device skeleton will do
    unknown = sorted(set(recipe.plan) - set(targets))
    if unknown:
        raise LowbitError(
            f"the recipe's plan names {len(unknown)} Linear{'s' if len(unknown) > 1 else ''} this model's blocks do not "
            f"have or the recipe ignores (first: {unknown[0]!r}); plan this model again (give the recipe a budget "
            "without a plan)"
        )
    if recipe.budget is None:
        return  # a hand-written plan may name some Linears only: the others keep the steps' grid
    missing = sorted(set(targets) - set(recipe.plan))
    bits = plan_bits(recipe.plan, targets) if not missing else 0.0
    if missing or bits > recipe.budget:
        what = f"leaves {len(missing)} Linears out (first: {missing[0]})" if missing else (
            f"stores {bits:.4f} bits per weight, over its budget of {recipe.budget:g}")
        raise LowbitError(f"recipe {recipe.name!r}: its plan {what}; drop \"plan\" from the recipe to plan again")


def resolve_groups(ctx: BlockContext, norms_only: bool = False) -> list[ResolvedGroup]:
    """The architecture's scale groups as modules. Optional groups whose shapes forbid folding are skipped (they
    are expected to, e.g. v_proj -> o_proj under grouped-query attention); any other group that cannot be folded
    carries the reason, which the transforms record as a refused fold: its Linears are quantized unsmoothed."""
    groups = []
    for spec in ctx.arch.groups:
        if not ctx.arch.applies(spec, ctx.block):  # a group of another build of block (dense vs MoE layers)
            continue
        prev = get_submodule(ctx.block, spec.prev, ctx.model_type)
        if norms_only and isinstance(prev, nn.Linear):
            continue
        linears = [get_submodule(ctx.block, p, ctx.model_type) for p in spec.linears]
        passengers = [get_submodule(ctx.block, p, ctx.model_type) for p in spec.passengers]
        blocker = fold_blocker(prev, linears, passengers)  # type: ignore[arg-type]
        if blocker and spec.optional:
            continue
        groups.append(ResolvedGroup(spec, prev, linears, blocker, passengers))  # type: ignore[arg-type]
    return groups


def shared_inputs(arch: Arch, block: nn.Module, paths: list[str]) -> list[list[str]]:
    """``paths`` (Linears of ``block``) split into lists reading the same input, in block order: a scale group's
    Linears (fed by one op) together, then the Linears of one true-sequential stage (a stage is the Linears called
    on one input; a merged stage of different experts' down projections is not), every other Linear alone. The one
    source of this fact for the compression statistics (one Hessian per input) and for inspect (one row per input)."""
    from lowbit.models.experts import RoutedExperts

    def expert_of(path: str) -> str | None:  # "mlp.experts.3" for a Linear inside routed expert 3
        owner = path.rpartition(".")[0]  # "mlp.experts.3"
        parent = owner.rpartition(".")[0]  # "mlp.experts"
        try:
            return owner if isinstance(block.get_submodule(parent), RoutedExperts) else None
        except AttributeError:
            return None

    lists: list[list[str]] = []
    assigned: set[str] = set()

    def take(candidates: list[str]) -> None:
        together = [p for p in candidates if p in paths and p not in assigned]
        if together:
            lists.append(together)
            assigned.update(together)

    for group in arch.groups:
        if arch.applies(group, block):
            take(list(group.linears))
    for stage in arch.sequential:
        experts = {expert_of(p) for p in stage}
        if len(experts) > 1 and None not in experts:  # one Linear per expert: each reads its own expert's input
            continue
        take(list(stage))
    lists += [[p] for p in paths if p not in assigned]
    return sorted(lists, key=lambda paths_: min(paths.index(p) for p in paths_))
