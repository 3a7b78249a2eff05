"""Everything the recipe does to one decoder block: transform, compress, measure."""

from __future__ import annotations

import time
from typing import Any

import torch

from lowbit.pipeline.compress import adjusted_weight, compress_block, finish_block
from lowbit.pipeline.float_stream import float_targets
from lowbit.pipeline.context import BlockContext
from lowbit.pipeline.measure import ErrorMeter, measure_block
from lowbit.pipeline.pass_cache import PassCache, budget_from_env
from lowbit.pipeline.report import BlockRecord, LinearRecord
from lowbit.pipeline.taps import run_with_taps
from lowbit.recipe import Recipe


def process_block(
    ctx: BlockContext, recipe: Recipe, batch_size: int, saved: dict[str, torch.Tensor] | None, index: int
) -> BlockRecord:
    """Transform and compress ``ctx.block`` in place; afterwards ``ctx.data.hidden`` holds its quantized outputs.
    The record's ``phases`` say where the block's time went (seconds)."""
    assert ctx.data is not None
    start = time.perf_counter()
    phases: dict[str, float] = {}
    fp_outputs = None
    for transform in recipe.block_transforms:  # a rotation (no outputs of its own), then SmoothQuant/AWQ
        fp_outputs = transform.transform_block(ctx, batch_size, saved)
    if fp_outputs is None:
        # nothing to calibrate: only the reference outputs for the error measurement are needed
        fp_outputs = run_with_taps(ctx.block, ctx.data, max_outputs=ctx.error_batches, max_batches=ctx.error_batches)
        phases["reference pass"] = time.perf_counter() - start
    else:
        phases["transform"] = time.perf_counter() - start
    # the full-precision reference of each Linear after the (output-preserving) transform
    references = {
        path: (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
        for path, lin in ctx.targets.items()
    }
    meter = ErrorMeter(references, ctx.error_batches, len(fp_outputs))
    tuned = tune_block(ctx, recipe, phases)
    # from here on the block's modules are only swapped, never edited in place: the passes can share outputs
    cache = PassCache(ctx.block, budget_from_env())
    compressed = compress_block(ctx, recipe, cache, meter, phases, tuned)
    mark = time.perf_counter()
    measured = measure_block(ctx.block, ctx.data, meter, fp_outputs, cache)
    phases["final pass"] = time.perf_counter() - mark
    del cache
    finish_block(ctx, compressed)
    linears = []
    for path, c in compressed.items():
        note = c.note
        if path in measured.outlier_share:
            note = f"{note}, " if note else ""
            note += f"outlier columns {measured.outlier_share[path]:.2%}"
        linears.append(LinearRecord(ctx.full_name(path), c.method, measured.linear_error[path], c.seconds, note))
    return BlockRecord(index, time.perf_counter() - start, measured.block_error, linears, phases=phases)


def tune_block(ctx: BlockContext, recipe: Recipe, phases: dict[str, float]) -> dict[str, Any]:
    """What the recipe's rounding step learns from the whole block before compressing it (AutoRound), toward the
    float model's outputs where it asks for them; empty for every other step."""
    step = recipe.weight_step
    if step is None or not recipe.needs().float_targets:
        return {}
    assert ctx.data is not None
    mark = time.perf_counter()
    targets = float_targets(ctx.block, ctx.data)
    phases["float targets"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tuned = step.tune_block(ctx, targets, lambda path: adjusted_weight(ctx, recipe, path))
    phases["tune"] = time.perf_counter() - mark
    return tuned


def compress_without_data(ctx: BlockContext, recipe: Recipe, index: int) -> BlockRecord:
    """A data-free recipe (``not recipe.needs_calibration``) without a calibration pass: nothing to measure, so the
    errors are NaN."""
    start = time.perf_counter()
    compressed = compress_block(ctx, recipe)
    nan = float("nan")
    linears = [LinearRecord(ctx.full_name(p), c.method, nan, c.seconds, c.note) for p, c in compressed.items()]
    seconds = time.perf_counter() - start
    return BlockRecord(index, seconds, nan, linears, phases={"compress": seconds})
