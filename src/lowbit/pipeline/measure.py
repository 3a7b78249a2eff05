"""The final pass over a compressed block: its outputs become the next block's inputs, and on the way each
compressed Linear's output is compared with the full-precision Linear on the very same input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.pipeline.capture import run_block
from lowbit.pipeline.taps import BlockData
from lowbit.runtime.llm_int8 import Int8OutlierLinear, outlier_columns


@dataclass
class Measurement:
    linear_error: dict[str, float]  # ||y_q - y_fp|| / ||y_fp|| per Linear path
    outlier_share: dict[str, float]  # LLM.int8(): mean share of input columns sent to the float path
    block_error: float  # ||block_q(x) - block_fp(x)|| / ||block_fp(x)|| on the sampled batches


def relative_error(err_sq: float, ref_sq: float) -> float:
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def measure_block(
    block: nn.Module,
    data: BlockData,
    modules: dict[str, nn.Module],
    references: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    fp_outputs: list[torch.Tensor],
) -> Measurement:
    """Run the compressed block over every batch, replacing ``data.hidden`` in place by its outputs (the inputs
    are not needed again, and this halves the activation memory). ``fp_outputs`` holds the full-precision outputs
    of the first batches; the block and Linear errors are measured on those batches only."""
    sums = {path: [0.0, 0.0] for path in modules}
    measuring = [True]  # whether the current batch is one of the measured ones
    shares: dict[str, list[float]] = {p: [] for p, m in modules.items() if isinstance(m, Int8OutlierLinear)}

    def error_hook(path: str):
        W_ref, b_ref = references[path]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not measuring[0]:
                return
            x = args[0]
            y_ref = F.linear(x, W_ref.to(x.dtype), None if b_ref is None else b_ref.to(x.dtype))
            sums[path][0] += float((output.float() - y_ref.float()).pow(2).sum())
            sums[path][1] += float(y_ref.float().pow(2).sum())
            if path in shares:
                shares[path].append(float(outlier_columns(x, module.threshold).float().mean()))

        return hook

    handles = [block.get_submodule(p).register_forward_hook(error_hook(p)) for p in modules]
    block_err = [0.0, 0.0]
    try:
        with torch.no_grad():
            for b, call in enumerate(data.calls):  # local batches; the measured ones come first
                measuring[0] = b < len(fp_outputs)
                out = run_block(block, data.hidden[b], call)
                if b < len(fp_outputs):
                    ref = fp_outputs[b].float()
                    block_err[0] += float((out.float() - ref).pow(2).sum())
                    block_err[1] += float(ref.pow(2).sum())
                data.hidden[b] = out
    finally:
        for handle in handles:
            handle.remove()
    if data.ranks.distributed:  # the error sums of every rank's measured batches: one process's sums
        paths = list(sums)
        flat = data.ranks.sum_floats(
            block_err + [v for p in paths for v in sums[p]] + [x for p in shares for x in (sum(shares[p]), len(shares[p]))]
        )
        block_err, rest = flat[:2], flat[2:]
        sums = {p: rest[2 * k : 2 * k + 2] for k, p in enumerate(paths)}
        rest = rest[2 * len(paths) :]
        shares = {p: [rest[2 * k] / rest[2 * k + 1]] if rest[2 * k + 1] else [] for k, p in enumerate(shares)}
    return Measurement(
        linear_error={p: relative_error(*s) for p, s in sums.items()},
        outlier_share={p: sum(v) / len(v) for p, v in shares.items() if v},
        block_error=relative_error(*block_err),
    )
