"""Each compressed Linear's output compared with the full-precision Linear on the very same input, and the final
pass over a compressed block, whose outputs become the next block's inputs.

A Linear is measured in the first pass that runs it after its compression (the next stage's statistics pass, or
the final pass for the last stage): its inputs there are the ones it will see in the final pass, since only
stages downstream of it change in between. Measuring there, not in the final pass, leaves the final pass free to
take every earlier stage's outputs from the pass cache (a hooked module must run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.pipeline.capture import run_block
from lowbit.pipeline.compute import full_precision
from lowbit.pipeline.pass_cache import PassCache
from lowbit.pipeline.taps import BlockData
from lowbit.runtime.llm_int8 import Int8OutlierLinear, outlier_columns


@dataclass
class Measurement:
    linear_error: dict[str, float]  # ||y_q - y_fp|| / ||y_fp|| per Linear path
    outlier_share: dict[str, float]  # LLM.int8(): mean share of input columns sent to the float path
    block_error: float  # ||block_q(x) - block_fp(x)|| / ||block_fp(x)|| on the sampled batches


def relative_error(err_sq: float, ref_sq: float) -> float:
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


@dataclass
class ErrorMeter:
    """Squared-error sums of compressed Linears on the measured batches (global numbers below ``batches``), over
    the passes that run them. ``local_batches``: how many measured batches this rank runs."""

    references: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # path -> full-precision (W, b)
    batches: int
    local_batches: int
    sums: dict[str, list[float]] = field(default_factory=dict)  # path -> [error^2, reference^2]
    shares: dict[str, list[float]] = field(default_factory=dict)  # LLM.int8() outlier shares per measured batch
    pending: dict[str, nn.Module] = field(default_factory=dict)  # compressed, not yet measured: path -> module
    seen: dict[str, set[int]] = field(default_factory=dict)
    batch: int = -1

    def add(self, compressed: dict[str, nn.Module]) -> None:
        for path, module in compressed.items():
            self.pending[path] = module
            self.sums[path] = [0.0, 0.0]
            self.seen[path] = set()
            if isinstance(module, Int8OutlierLinear):
                self.shares[path] = []

    def begin_batch(self, batch: int) -> None:
        self.batch = batch

    @contextmanager
    def hooked(self, block: nn.Module) -> Iterator[None]:
        """Measure the pending Linears in the pass run inside; those that saw every measured batch are done."""
        # batches measured in an earlier pass (one that stopped before this Linear on some batches) are not again
        handles = [
            block.get_submodule(p).register_forward_hook(self._hook(p, frozenset(self.seen[p]))) for p in self.pending
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for path in [p for p in self.pending if len(self.seen[p]) >= self.local_batches]:
            del self.pending[path]

    def _hook(self, path: str, measured_before: frozenset[int]):
        W_ref, b_ref = self.references[path]
        module = self.pending[path]

        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.batch >= self.batches or self.batch in measured_before:
                return
            self.seen[path].add(self.batch)
            x = args[0]
            # in the weights' dtype, or in float32 when the pass computes in a lower precision (the Linear's output
            # then carries that precision's rounding too, about 0.3% relative for bfloat16)
            dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
            with full_precision(x):
                y_ref = F.linear(x.to(dtype), W_ref.to(dtype), None if b_ref is None else b_ref.to(dtype)).float()
                self.sums[path][0] += float((output.float() - y_ref).pow(2).sum())
                self.sums[path][1] += float(y_ref.pow(2).sum())
                if path in self.shares:
                    self.shares[path].append(float(outlier_columns(x, module.threshold).float().mean()))

        return hook


def measure_block(
    block: nn.Module, data: BlockData, meter: ErrorMeter, fp_outputs: list[torch.Tensor], cache: PassCache | None = None,
) -> Measurement:
    """Run the compressed block over every batch, replacing ``data.hidden`` in place by its outputs (the inputs
    are not needed again, and this halves the activation memory), measuring the Linears still pending on the way.
    ``fp_outputs`` holds the full-precision outputs of the measured batches (the first local ones)."""
    block_err = [0.0, 0.0]
    with meter.hooked(block), torch.no_grad():
        for b, (global_b, hidden, call) in enumerate(data.numbered()):
            meter.begin_batch(global_b)
            with cache.forward_of(global_b) if cache is not None else nullcontext(), data.computing():
                out = run_block(block, hidden, call)
            if b < len(fp_outputs):
                ref = fp_outputs[b].float()
                block_err[0] += float((out.float() - ref).pow(2).sum())
                block_err[1] += float(ref.pow(2).sum())
            data.hidden[b] = out
    sums, shares = meter.sums, meter.shares
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
