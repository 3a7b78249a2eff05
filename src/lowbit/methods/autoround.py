"""AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs"; intel/auto-round, llm-compressor's AutoRoundModifier): per block, every weight's rounding offset and every
group's range are learned by signed gradient descent on the block's output error."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.base import ROUND, Compression, LinearStats, Needs, Step, WeightQuant, check
from lowbit.numerics.autoround import Rounding, fake_quantize_tuned, sign_step, tuned_qweight
from lowbit.pipeline.capture import run_block

if TYPE_CHECKING:
    from lowbit.pipeline.context import BlockContext
    from lowbit.pipeline.taps import BlockData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoRound(Step):
    """Per block: wrap every Linear's weight as round(W / scale + v) with v in [-0.5, 0.5] and the group range
    shrunk by factors in [0, 1]; for ``iters`` steps, run one calibration batch through the block, take the mean
    squared error against the float model's own output of the block (the float stream: pipeline/float_stream.py),
    and move every parameter by -lr * sign(gradient), lr decaying linearly to 0; keep the parameters of the lowest
    loss seen (``best``). The published defaults: 200 steps, lr 1 / steps for both, batches of 8 sequences (the
    run's ``--batch-size``). ``iters=0`` is round-to-nearest."""

    kind: ClassVar[str] = "autoround"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)
    iters: int = 200
    lr: float = 0.0  # 0: 1 / iters
    range_lr: float = 0.0  # 0: lr
    tune_range: bool = True  # learn the group ranges too (auto-round's enable_minmax_tuning)
    best: bool = True  # keep the parameters of the lowest loss seen, not the last ones
    # train the block's forward and backward in bfloat16 autocast, as auto-round does by default (amp); the targets,
    # the loss and the learned parameters stay float32. False: every training pass in float32
    amp: bool = True

    def check(self) -> None:
        check(self.iters >= 0, f"autoround iters must be >= 0, got {self.iters}", "the published default is 200")
        check(self.lr >= 0 and self.range_lr >= 0, "autoround lr and range_lr must be >= 0 (0: 1 / iters)")
        check(not self.weights.searched, f"autoround learns each group's range itself, got {self.weights.label}",
              "drop \"fit\" (the -mse / -imse of a recipe name)")
        check(not self.weights.ggml and not self.weights.float_type and self.weights.fit == "range",
              f"autoround learns the rounding of an integer grid fitted from its range, got {self.weights.label}",
              "use e.g. bits 3, group_size 128")

    def check_recipe(self, recipe) -> None:  # noqa: ANN001
        check(not recipe.prunes, "autoround rounds dense weights (its offsets would move pruned zeros)",
              "prune with SparseGPT's joint rounding, or round the pruned weights with gptq")
        check(not recipe.quantizes_inputs, "autoround tunes weight-only recipes (its training runs float inputs)",
              "drop the act_quant step, or round with gptq")

    @property
    def rounds(self) -> bool:
        return True

    @property
    def sequential(self) -> bool:
        return False  # the whole block is tuned at once: no stage-by-stage statistics

    @property
    def label(self) -> str:
        return f"autoround {self.weights.label} {self.iters} iters"

    def needs(self) -> Needs:
        return Needs(float_targets=True)

    def tune_block(
        self, ctx: BlockContext, targets: list[torch.Tensor], weight_of: Callable[[str], torch.Tensor]
    ) -> dict[str, Any]:
        if self.iters == 0 or not ctx.targets:  # round to nearest; or a block whose Linears are all ignored
            return {}
        assert ctx.data is not None
        weights = {path: weight_of(path) for path in ctx.targets}  # [out, in] each, after AWQ's clip if any
        grids = {path: ctx.linear_grid(path, self.weights) for path in ctx.targets}  # a budget's plan: one per Linear
        roundings = {path: Rounding.initial(W, grids[path]) for path, W in weights.items()}
        first, best, best_at, last = tune(ctx.block, ctx.data, targets, ctx.targets, weights, grids, roundings, self,
                                          ctx.seed)
        note = f"block loss {first:.3g} -> {best:.3g} (step {best_at} of {self.iters}; last {last:.3g})"
        log.debug("%s: autoround %s", ctx.prefix, note)
        return {path: (r, note) for path, r in roundings.items()}

    def compress(self, c: Compression, stats: LinearStats) -> None:
        if stats.tuned is None:  # iters=0
            c.qweight = tuned_qweight(c.weight, self.weights, Rounding.initial(c.weight, self.weights))
            return
        rounding, note = stats.tuned
        c.qweight = tuned_qweight(c.weight, self.weights, rounding)
        c.notes.append(note)


class _TunedLinear(nn.Module):
    """A Linear computing with its weight on the grid under a learnable rounding (training only)."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, spec: WeightQuant, rounding: Rounding) -> None:
        super().__init__()
        self.W, self.bias, self.spec, self.rounding = W, bias, spec, rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_tuned(self.W, self.spec, self.rounding)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def tune(
    block: nn.Module, data: BlockData, targets: list[torch.Tensor], linears: dict[str, nn.Module],
    weights: dict[str, torch.Tensor], grids: dict[str, WeightQuant], roundings: dict[str, Rounding], step: AutoRound,
    seed: int,
) -> tuple[float, float, int, float]:
    """Learn ``roundings`` (in place: the best, or last, ones) of the float ``weights`` [out, in] of ``linears`` of
    ``block`` on their ``grids`` on the calibration batches of ``data`` toward ``targets``. Returns (first loss, best
    loss, its step, last loss)."""
    lr = step.lr or 1.0 / step.iters
    range_lr = (step.range_lr or lr) if step.tune_range else 0.0
    order = _batch_order(len(data.hidden), step.iters, seed)
    best = {path: r.detached() for path, r in roundings.items()}
    first = best_loss = last = math.inf
    best_at = 0
    frozen = [p for p in block.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for r in roundings.values():
            for t in r.tensors() if step.tune_range else [r.offset]:
                t.requires_grad_(True)
        for path, linear in linears.items():
            block.set_submodule(path, _TunedLinear(weights[path], linear.bias, grids[path], roundings[path]))
        with torch.enable_grad():
            for i, b in enumerate(order):
                with training_precision(data, step.amp):
                    out = run_block(block, data.hidden[b], data.calls[b])
                loss = F.mse_loss(out.float(), targets[b].float())
                loss.backward()
                last = loss.item()
                first = last if i == 0 else first
                if last < best_loss:  # the loss of the parameters before this step's update
                    best_loss, best_at = last, i
                    best = {path: r.detached() for path, r in roundings.items()}
                decay = 1.0 - i / step.iters  # auto-round's linear schedule to 0
                for r in roundings.values():
                    sign_step(r, lr * decay, range_lr * decay)
    finally:
        for path, linear in linears.items():
            block.set_submodule(path, linear)
        for p in frozen:
            p.requires_grad_(True)
    final = best if step.best else {path: r.detached() for path, r in roundings.items()}
    for path, r in roundings.items():
        r.offset, r.lo, r.hi = final[path].offset, final[path].lo, final[path].hi
    return first, best_loss, best_at, last


def training_precision(data: BlockData, amp: bool) -> AbstractContextManager:
    """bfloat16 autocast for the training passes (``amp``), else the run's own calibration precision."""
    if not amp:
        return data.computing()
    device = data.hidden[0].device.type if data.hidden else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def _batch_order(n_batches: int, iters: int, seed: int) -> list[int]:
    """``iters`` calibration batch numbers: every batch once per epoch, in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < iters:
        order += torch.randperm(n_batches, generator=generator).tolist()
    return order[:iters]
