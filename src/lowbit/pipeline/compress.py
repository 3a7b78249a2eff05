"""Prune and round one block's Linears, stage by stage, and swap in runtime modules.

Stages follow the architecture table's true-sequential order: each stage's statistics (Hessian, input norms,
input ranges) are collected with the earlier stages already compressed, so every Linear is fitted to the inputs
it will really see. A recipe that needs no statistics compresses everything without a forward pass.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.distributed.divide import divide_work
from lowbit.methods.base import Compression, LinearStats, Step
from lowbit.numerics.float_formats import FLOAT_TYPES
from lowbit.pipeline.context import BlockContext, shared_inputs
from lowbit.pipeline.measure import ErrorMeter
from lowbit.pipeline.observers import AbsMaxObserver, HessianObserver, InputNormObserver
from lowbit.pipeline.pass_cache import PassCache
from lowbit.pipeline.taps import run_with_taps
from lowbit.recipe import Recipe
from lowbit.numerics.rotation import rotate_last_dim, rotation_factors
from lowbit.runtime.kquant_linear import weight_only_linear
from lowbit.runtime.rotated_input import RotatedInput
from lowbit.runtime.sparse import SparseLinear


@dataclass
class Compressed:
    module: nn.Module
    method: str
    seconds: float
    note: str = ""


@dataclass
class _Stats:
    hessian: HessianObserver | None = None
    norm: InputNormObserver | None = None
    absmax: AbsMaxObserver | None = None
    tensor_absmax: torch.Tensor | None = None  # largest |w| of the Linears sharing the input (NVFP4's tensor scale)

    def observers(self) -> list:
        return [o for o in (self.hessian, self.norm, self.absmax) if o is not None]

    def collected(self) -> LinearStats:
        return LinearStats(
            self.hessian.H if self.hessian is not None else None,
            self.norm.norm if self.norm is not None else None,
            self.absmax.absmax if self.absmax is not None else None,
            tensor_absmax=self.tensor_absmax,
        )


def _stages(ctx: BlockContext, recipe: Recipe) -> list[list[str]]:
    stages = [[p for p in stage if p in ctx.targets] for stage in ctx.arch.sequential]
    if not recipe.sequential:
        stages = [[p for stage in stages for p in stage]]
    return [s for s in stages if s]


def compress_block(
    ctx: BlockContext,
    recipe: Recipe,
    cache: PassCache | None = None,
    meter: ErrorMeter | None = None,
    phases: dict[str, float] | None = None,
    tuned: dict[str, Any] | None = None,
) -> dict[str, Compressed]:
    """Compress every target of ``ctx.block``, stage by stage. Each stage's statistics pass takes unchanged
    submodule outputs from ``cache`` and measures the previous stages' Linears with ``meter``; the seconds spent
    in passes and in fitting are added to ``phases``. ``tuned``: per Linear, what a block-level step learned for it
    (``Step.tune_block``)."""
    phases = {} if phases is None else phases
    tuned = {} if tuned is None else tuned
    needs = recipe.needs()
    label = recipe.method_label
    done: dict[str, Compressed] = {}
    for stage in _stages(ctx, recipe):
        stats: dict[str, _Stats] = {}
        taps: dict[str, list] = {}
        for paths in shared_inputs(ctx.arch, ctx.block, stage):
            # Linears fed by one tensor (q/k/v, gate/up) share one set of statistics: X^T X once, not per Linear
            shared = _Stats(
                HessianObserver(needs.hessian_skip_first) if needs.hessian else None,
                InputNormObserver() if needs.input_norm else None,
                AbsMaxObserver() if needs.input_absmax else None,
            )
            stats.update(dict.fromkeys(paths, shared))
            if shares_tensor_scale(recipe):
                shared.tensor_absmax = torch.stack(
                    [adjusted_weight(ctx, recipe, p).abs().amax() for p in paths]).amax()
            if shared.observers():
                taps[paths[0]] = shared.observers()
        if taps:
            assert ctx.data is not None, "a recipe that observes inputs runs with calibration data"
            mark = time.perf_counter()
            with meter.hooked(ctx.block) if meter is not None else nullcontext():
                run_with_taps(ctx.block, ctx.data, taps, stop_early=True, cache=cache, meter=meter)
            phases["statistics passes"] = phases.get("statistics passes", 0.0) + time.perf_counter() - mark

        def compress(path: str) -> Compressed:
            start = time.perf_counter()
            module, note = _compress_linear(ctx, path, recipe, stats[path], tuned.get(path))
            own = label if not ctx.plan else " + ".join(placed(s, ctx, path).label for s in recipe.effective_steps)
            return Compressed(module, own, time.perf_counter() - start, note)

        # on several ranks each compresses its share of the stage's Linears and receives the others'
        mark = time.perf_counter()
        results = divide_work(ctx.ranks, stage, lambda p: linear_cost(ctx.targets[p]), compress)
        phases["compress"] = phases.get("compress", 0.0) + time.perf_counter() - mark
        for path, c in results.items():
            # a block that runs no further pass (data-free) gets its runtime module directly
            computing = c.module if ctx.data is None else calibration_stand_in(c.module, ctx.targets[path].weight.dtype)
            ctx.block.set_submodule(path, computing)
            done[path] = c
        if meter is not None:
            meter.add({path: done[path].module for path in stage})
    return done


def shares_tensor_scale(recipe: Recipe) -> bool:
    """Whether the recipe rounds onto a grid with one scale per tensor that servers share across fused Linears."""
    grid = recipe.weight_step.grid if recipe.weight_step is not None else None
    return grid is not None and bool(grid.float_type) and FLOAT_TYPES[grid.float_type].has_global_scale


def linear_cost(linear: nn.Linear) -> float:
    """Relative cost of compressing a Linear [out, in]: GPTQ's column loop is out * in^2, its Cholesky in^3 / 3."""
    n_in, n_out = linear.in_features, linear.out_features
    return float(n_in) ** 2 * (n_out + n_in / 3)


def calibration_stand_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What the block computes with until it is finished: a weight-only or pruned module as a plain Linear holding
    its dequantized / dense weight (bit-identical outputs; the later stage passes and the measurement pass would
    otherwise unpack it on every call; modules that quantize their inputs compute themselves). ``finish_block`` puts
    the packed modules back."""
    stand_in = getattr(module, "calibration_stand_in", None)  # a registered method's own module may not have one
    return stand_in(dtype) if callable(stand_in) else module


def finish_block(ctx: BlockContext, compressed: dict[str, Compressed]) -> None:
    """Swap the runtime modules in for their calibration stand-ins."""
    for path, c in compressed.items():
        ctx.block.set_submodule(path, c.module)


def adjusted_weight(ctx: BlockContext, recipe: Recipe, path: str) -> torch.Tensor:
    """The float weight [out, in] of the Linear at ``path`` after every step's ``adjust_weight`` (AWQ's clip)."""
    weight = ctx.targets[path].weight.detach().float()
    for step in recipe.effective_steps:
        weight = placed(step, ctx, path).adjust_weight(ctx, path, weight)
    return weight


def _compress_linear(
    ctx: BlockContext, path: str, recipe: Recipe, stats: _Stats, tuned: Any
) -> tuple[nn.Module, str]:
    """Every step's hooks on one Linear, in recipe order: adjust the float weight, prune and/or round it, then the
    runtime module the last deciding step builds (weight-only packed, or sparse when nothing was rounded)."""
    linear = ctx.targets[path]
    steps = tuple(placed(step, ctx, path) for step in recipe.effective_steps)
    c = Compression(adjusted_weight(ctx, recipe, path))
    collected = stats.collected()
    collected.tuned = tuned
    seed = ctx.online.get(path)
    if seed is not None:  # an online rotation Q of the inputs: W Q is compressed, under Q^T H Q
        c, collected = rotated_compression(c, collected, seed)
    for step in steps:
        step.compress(c, collected)
    if c.keep is not None:
        c.notes.append(f"sparsity {1 - c.keep.float().mean().item():.1%}")
    bias = linear.bias.detach() if linear.bias is not None else None
    module = next((m for m in (s.runtime_module(c, bias, collected) for s in reversed(steps)) if m is not None), None)
    if module is None:
        if c.qweight is None:  # pruning only: the kept weights and a bitmap
            module = SparseLinear.from_dense(c.weight.to(linear.weight.dtype), bias)
        else:
            module = weight_only_linear(c.qweight, bias)
    if seed is not None:
        module = RotatedInput.around(module, linear.in_features, linear.out_features, seed)
    return module, ", ".join(n for n in c.notes if n)


def rotated_compression(c: Compression, stats: LinearStats, seed: int) -> tuple[Compression, LinearStats]:
    """The weight [out, in] as W Q and the Hessian of the rotated inputs, Q^T H Q, for a Linear whose inputs are
    rotated online by ``rotation_factors(in, seed)`` (its other statistics are refused with online rotations:
    ``Rotate.check_recipe``)."""
    signs, mix = rotation_factors(c.weight.shape[1], seed)
    weight = rotate_last_dim(c.weight.double(), signs, mix).to(c.weight.dtype)  # each row w -> w Q
    hessian = stats.hessian
    if hessian is not None:  # H Q by rows, then (Q^T (H Q)) = ((H Q)^T Q)^T, H symmetric
        hq = rotate_last_dim(hessian.double(), signs, mix)
        hessian = rotate_last_dim(hq.T.contiguous(), signs, mix).T.contiguous().to(stats.hessian.dtype)
    return Compression(weight, notes=c.notes), dataclasses.replace(stats, hessian=hessian)


def placed(step: Step, ctx: BlockContext, path: str) -> Step:
    """``step`` on the grid of the Linear at ``path``: its own, or the type a llama.cpp mix gives that Linear."""
    grid = step.grid
    if grid is None:
        return step
    own = ctx.linear_grid(path, grid)
    return step if own == grid else dataclasses.replace(step, weights=own)  # type: ignore[type-var]
