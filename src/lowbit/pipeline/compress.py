"""Prune and round one block's Linears, stage by stage, and swap in runtime modules.

Stages follow the architecture table's true-sequential order: each stage's statistics (Hessian, input norms,
input ranges) are collected with the earlier stages already compressed, so every Linear is fitted to the inputs
it will really see. A recipe that needs no statistics compresses everything without a forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.numerics.activations import static_scale_from_absmax
from lowbit.numerics.awq_clip import apply_clip
from lowbit.numerics.obs import gptq, sparsegpt
from lowbit.numerics.prune import magnitude_scores, prune_mask, wanda_scores
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.context import BlockContext
from lowbit.pipeline.observers import AbsMaxObserver, HessianObserver, InputNormObserver
from lowbit.pipeline.taps import run_with_taps
from lowbit.pipeline.transforms import AWQ_CLIP_KEY
from lowbit.recipe import AWQ, GPTQ, RTN, ActQuant, LLMInt8, Prune, Recipe, SparseGPT, WeightQuant, parse_pattern
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.llm_int8 import Int8OutlierLinear
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear

INT8_PER_CHANNEL = WeightQuant(bits=8, symmetric=True, granularity="channel")


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

    def observers(self) -> list:
        return [o for o in (self.hessian, self.norm, self.absmax) if o is not None]


def describe(recipe: Recipe) -> str:
    """A short method label for the per-layer table, e.g. 'awq + gptq W4 asym g128 act-order'."""
    parts = []
    for step in recipe.steps:
        if isinstance(step, Prune):
            parts.append(f"{step.method} {step.pattern if step.pattern != 'unstructured' else f'{step.sparsity:.0%}'}")
        elif isinstance(step, SparseGPT):
            parts.append(f"sparsegpt {step.pattern if step.pattern != 'unstructured' else f'{step.sparsity:.0%}'}")
        elif isinstance(step, (RTN, GPTQ)):
            parts.append(f"{step.kind} {step.weights.label}" + (" act-order" if getattr(step, "act_order", False) else ""))
        elif isinstance(step, ActQuant):
            parts.append(step.label)
        elif isinstance(step, LLMInt8):
            parts.append(f"llm.int8 t={step.threshold}")
        else:
            parts.append(step.kind)
    if recipe.find(AWQ) is not None and not any(isinstance(s, (RTN, GPTQ)) for s in recipe.steps):
        parts.append(f"rtn {recipe.find(AWQ).weights.label}")
    return " + ".join(parts)


def _stages(ctx: BlockContext, recipe: Recipe) -> list[list[str]]:
    step = recipe.weight_step
    stages = [[p for p in stage if p in ctx.targets] for stage in ctx.arch.sequential]
    if isinstance(step, GPTQ) and not step.true_sequential:
        stages = [[p for stage in stages for p in stage]]
    return [s for s in stages if s]


def _shared_inputs(ctx: BlockContext, stage: list[str]) -> list[list[str]]:
    """``stage`` split into lists of Linears that read the same input: a scale group's Linears (fed by one norm or
    Linear, by the architecture table) together, every other Linear alone."""
    lists: list[list[str]] = []
    assigned: set[str] = set()
    for group in ctx.arch.groups:
        together = [p for p in group.linears if p in stage and p not in assigned]
        if together:
            lists.append(together)
            assigned.update(together)
    return lists + [[p] for p in stage if p not in assigned]


def compress_block(ctx: BlockContext, recipe: Recipe) -> dict[str, Compressed]:
    need_h, need_norm, need_absmax = recipe.input_statistics
    weight_step = recipe.weight_step
    skip_first = weight_step.skip_first_positions if isinstance(weight_step, GPTQ) else 0
    label = describe(recipe)
    done: dict[str, Compressed] = {}
    for stage in _stages(ctx, recipe):
        stats: dict[str, _Stats] = {}
        taps: dict[str, list] = {}
        for paths in _shared_inputs(ctx, stage):
            # Linears fed by one tensor (q/k/v, gate/up) share one set of statistics: X^T X once, not per Linear
            shared = _Stats(
                HessianObserver(skip_first) if need_h else None,
                InputNormObserver() if need_norm else None,
                AbsMaxObserver() if need_absmax else None,
            )
            stats.update(dict.fromkeys(paths, shared))
            if shared.observers():
                taps[paths[0]] = shared.observers()
        if taps:
            assert ctx.data is not None, "a recipe that observes inputs runs with calibration data"
            run_with_taps(ctx.block, ctx.data, taps, stop_early=True)
        for path in stage:
            start = time.perf_counter()
            module, note = _compress_linear(ctx, path, recipe, stats[path])
            # a block that runs no further pass (data-free) gets its runtime module directly
            placed = module if ctx.data is None else calibration_stand_in(module, ctx.targets[path].weight.dtype)
            ctx.block.set_submodule(path, placed)
            done[path] = Compressed(module, label, time.perf_counter() - start, note)
    return done


def calibration_stand_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What the block computes with until it is finished: a weight-only or pruned module as a plain Linear holding
    its dequantized / dense weight (bit-identical outputs; the later stage passes and the measurement pass would
    otherwise unpack it on every call). ``finish_block`` puts the packed modules back."""
    if isinstance(module, SparseLinear):
        weight = module.dense_weight(dtype)
    elif type(module) is WeightOnlyLinear:  # its subclasses quantize activations too: they compute themselves
        weight = module.dequantized_weight(dtype)
    else:
        return module
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device,
                       dtype=dtype)
    linear.weight.data = weight
    if module.bias is not None:
        linear.bias.data = module.bias.to(dtype)
    return linear


def finish_block(ctx: BlockContext, compressed: dict[str, Compressed]) -> None:
    """Swap the runtime modules in for their calibration stand-ins."""
    for path, c in compressed.items():
        ctx.block.set_submodule(path, c.module)


def _compress_linear(ctx: BlockContext, path: str, recipe: Recipe, stats: _Stats) -> tuple[nn.Module, str]:
    linear = ctx.targets[path]
    W = linear.weight.detach().float()
    H = stats.hessian.H if stats.hessian is not None else None
    notes: list[str] = []
    awq = recipe.find(AWQ)
    clip = ctx.artifact.get(ctx.full_name(f"{path}.{AWQ_CLIP_KEY}"))
    if awq is not None and clip is not None:
        W = apply_clip(W, clip.to(W.device), awq.weights)

    keep: torch.Tensor | None = None
    prune = recipe.find(Prune)
    if prune is not None:
        scores = wanda_scores(W, stats.norm.norm) if prune.method == "wanda" else magnitude_scores(W)
        mask = prune_mask(scores, prune.sparsity, parse_pattern(prune.pattern), per_row=prune.method == "wanda")
        W = W.masked_fill(mask, 0.0)
        keep = ~mask

    qweight: QWeight | None = None
    sgpt = recipe.find(SparseGPT)
    if sgpt is not None:
        assert H is not None
        result = sparsegpt(W, H, sgpt.sparsity or 0.0, parse_pattern(sgpt.pattern), sgpt.weights, sgpt.damp, sgpt.block_size)
        W, qweight, keep = result.weight, result.qweight, ~result.pruned
        notes.append(_damp_note(result.damp, result.retries))

    step = recipe.weight_step
    if isinstance(step, RTN):
        qweight = rtn(W, step.weights)
    elif isinstance(step, GPTQ):
        assert H is not None
        result = gptq(
            W, H, step.weights, keep_mask=keep, act_order=step.act_order, static_groups=step.static_groups,
            damp=step.damp, block_size=step.block_size,
        )
        qweight = result.qweight
        notes.append(_damp_note(result.damp, result.retries))
    elif isinstance(step, LLMInt8):
        qweight = rtn(W, INT8_PER_CHANNEL)

    if keep is not None:
        notes.append(f"sparsity {1 - keep.float().mean().item():.1%}")
    return _runtime_module(linear, W, qweight, recipe, stats), ", ".join(n for n in notes if n)


def _damp_note(damp: float, retries: int) -> str:
    return f"damp raised to {damp:g} after {retries} Cholesky failure(s)" if retries else ""


def _runtime_module(linear: nn.Linear, W: torch.Tensor, qweight: QWeight | None, recipe: Recipe, stats: _Stats) -> nn.Module:
    bias = linear.bias.detach() if linear.bias is not None else None
    if qweight is None:  # pruning only: the kept weights and a bitmap
        return SparseLinear.from_dense(W.to(linear.weight.dtype), bias)
    llm_int8 = recipe.find(LLMInt8)
    if llm_int8 is not None:
        return Int8OutlierLinear.from_qweight(qweight, bias, threshold=llm_int8.threshold)
    act = recipe.find(ActQuant)
    if act is None:
        return WeightOnlyLinear.from_qweight(qweight, bias)
    module = ActQuantLinear.from_qweight(
        qweight, bias, act_bits=act.bits, act_per_token=act.granularity == "token",
        act_symmetric=act.symmetric, act_static=not act.dynamic,
    )
    if not act.dynamic:
        assert stats.absmax is not None and stats.absmax.absmax is not None
        module.input_scale = static_scale_from_absmax(stats.absmax.absmax.max(), act.bits)
    return module
