"""How much each Linear's rounding costs the model, per candidate grid, and the per-Linear plan that meets a budget.

The cost is the second-order estimate of the loss increase with the empirical Fisher as the Hessian (SqueezeLLM's
sensitivity, the diagonal of HAWQ's): rounding W to Q adds about 0.5 * sum_ij F_ij (W_ij - Q_ij)^2 to the
calibration loss, where F = E_n[g_n^2] is the mean over calibration sequences of each weight's squared loss gradient.
Unlike a Linear's output error it is in one unit (loss) for every Linear, so a bit moved from one Linear to another
is judged by what it does to the model. Each candidate is rounded to nearest with a min-max range (the method that
then rounds, GPTQ or AWQ, lowers every error; the ranking of grids is what the plan needs).

It needs one forward and backward pass of the whole float model per calibration sequence (gradients only for the
Linears being planned), so the model and two copies of those Linears' weights (gradients, Fisher) are in memory at
once: about 3x the float32 size of the blocks' Linears, unlike the one-block quantization loop that follows.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import WeightQuant
from lowbit.numerics.bit_budget import Choice, allocate, candidate_grids, stored_bits
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.context import check_ignore_leaves_work, named_targets
from lowbit.pipeline.loop import check_calibration
from lowbit.recipe import Recipe

log = logging.getLogger(__name__)
PLAN_PHASE = "budget plan"  # the report's phase name for the sensitivity pass and the allocation


def fisher_diagonal(model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """E_n[(dL_n/dW)^2] [out, in] for each of ``linears`` over the calibration sequences ``ids`` [N, L], L_n the mean
    next-token cross-entropy of sequence n (each sequence's own gradient, squared: the empirical Fisher)."""
    weights = [lin.weight for lin in linears.values()]
    trainable = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    fisher = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    try:
        model.eval()  # the model's function, not a dropout sample of it
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for seq in ids.split(1):  # [1, L]
                logits = model(input_ids=seq.to(weights[0].device), use_cache=False).logits  # [1, L, vocab]
                loss = F.cross_entropy(logits[0, :-1].float(), seq[0, 1:].to(logits.device))
                # a Linear the sequence never reached (an expert its tokens were not routed to) has no gradient
                for f, g in zip(fisher, torch.autograd.grad(loss, weights, allow_unused=True)):
                    if g is not None:
                        f.add_(g.float().square())
    finally:
        model.train(training)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return {name: f / len(ids) for name, f in zip(linears, fisher)}


def linear_choices(weight: torch.Tensor, fisher: torch.Tensor, grids: list[WeightQuant]) -> list[Choice]:
    """Each grid of ``grids`` as a Choice for the weight [out, in]: its stored bits and 0.5 * sum F (W - Q)^2."""
    W = weight.detach().float()
    out = []
    for grid in grids:
        scored = dataclasses.replace(grid, fit="range")  # min-max rounding ranks the grids (module docstring)
        Q = rtn(W, scored).dequantize(torch.float32)
        error = 0.5 * float((fisher * (W - Q).square()).sum())
        out.append(Choice(grid, stored_bits(grid, *W.shape), error))
    return out


def needs_plan(recipe: Recipe) -> bool:
    """Whether ``recipe`` has a budget still to plan (a recipe read back from an output carries its plan)."""
    return recipe.budget is not None and not recipe.plan


def plan_budget(model: nn.Module, blocks_path: str, recipe: Recipe, ids: torch.Tensor | None) -> Recipe:
    """``recipe`` with its ``plan``: a grid per Linear, chosen from its grid's candidates (numerics/bit_budget.py) to
    meet ``recipe.budget`` bits per weight over the planned Linears with the least estimated loss increase."""
    step = recipe.weight_step
    assert recipe.budget is not None and step is not None and step.grid is not None
    if ids is None:
        raise LowbitError(f"recipe {recipe.name!r} plans its grids to a budget from calibration data: pass token ids "
                          "[n_sequences, seq_len]")
    # the block loop's own checks, before the sensitivity pass rather than after it
    check_ignore_leaves_work(model.get_submodule(blocks_path), blocks_path, recipe.ignore)  # type: ignore[arg-type]
    ids = check_calibration(ids, model.config)
    start = time.perf_counter()
    linears = named_targets(model.get_submodule(blocks_path), blocks_path, recipe.ignore)  # type: ignore[arg-type]
    fisher = fisher_diagonal(model, linears, ids)
    unreached = [name for name, f in fisher.items() if not bool(f.any())]
    if unreached:  # a rarely routed expert: zero measured sensitivity would plan it onto the fewest bits
        raise LowbitError(
            f"no calibration token's loss reached {len(unreached)} Linear{'s' if len(unreached) > 1 else ''} (first: "
            f"{unreached[0]}; e.g. an expert the router never chose), so their sensitivity is unknown; calibrate with "
            "more or longer sequences (--nsamples, --seq-len) or quantize without a budget"
        )
    grids = candidate_grids(step.grid)
    options = {name: linear_choices(lin.weight, fisher.pop(name), grids) for name, lin in linears.items()}
    n_weights = sum(lin.weight.numel() for lin in linears.values())
    smallest = sum(min(c.bits for c in cs) for cs in options.values()) / n_weights
    if recipe.budget < smallest:
        raise LowbitError(f"a budget of {recipe.budget:g} bits per weight is below the fewest these grids store "
                          f"({smallest:.3f}: every Linear on {min(grids, key=lambda g: g.bits).label}); raise --budget")
    chosen = allocate(options, recipe.budget * n_weights)
    bits = sum(c.bits for c in chosen.values()) / n_weights
    log.info("budget %.3f bits per weight: planned %.4f over %d Linears in %.1fs", recipe.budget, bits, len(chosen),
             time.perf_counter() - start)
    return dataclasses.replace(recipe, plan={name: c.grid for name, c in chosen.items()})

