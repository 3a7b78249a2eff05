"""Run a decoder block over the calibration batches with observers tapped onto some of its modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.distributed.ranks import SINGLE, Ranks
from lowbit.errors import LowbitError
from lowbit.pipeline.capture import _StopForward, run_block
from lowbit.pipeline.compute import full_precision, lower_precision
from lowbit.pipeline.observers import CallRecorder

if TYPE_CHECKING:
    from lowbit.pipeline.measure import ErrorMeter
    from lowbit.pipeline.pass_cache import PassCache


@dataclass
class BlockData:
    """One block's calibration inputs: a hidden-state tensor and the recorded call arguments per batch this rank
    runs. ``index`` gives each local batch's global number (None: every batch, in order: one process) and
    ``tokens`` the token count of every global batch (what a sampling observer skips for batches other ranks run).
    """

    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]
    index: list[int] | None = None
    tokens: list[int] | None = None
    ranks: Ranks = SINGLE
    # the dtype the block's matmuls run in during calibration passes (None: the weights' own); statistics and
    # error sums stay float32 (compute.py)
    compute_dtype: torch.dtype | None = None
    # the float model's own inputs to this block (BlockCalls.float_hidden, shared: a block leaves its float outputs)
    float_hidden: list[torch.Tensor] = field(default_factory=list)

    def computing(self) -> AbstractContextManager:
        """The context every calibration forward of this block runs in."""
        return lower_precision(self.hidden[0].device if self.hidden else "cpu", self.compute_dtype)

    def numbered(self) -> list[tuple[int, torch.Tensor, tuple[tuple, dict]]]:
        """(global batch number, hidden, call) of every local batch, in increasing global order."""
        index = self.index if self.index is not None else range(len(self.hidden))
        return list(zip(index, self.hidden, self.calls))

    def skipped_tokens(self, before: int, after: int) -> list[int]:
        """Token counts of the global batches between local batches ``after`` and ``before`` (exclusive): the
        batches other ranks run there."""
        return [] if self.tokens is None else self.tokens[after + 1 : before]


def run_with_taps(
    block: nn.Module,
    data: BlockData,
    taps: Mapping[str, Sequence] | None = None,
    recorders: Mapping[str, CallRecorder] | None = None,
    stop_early: bool = False,
    max_outputs: int | None = None,
    max_batches: int | None = None,
    cache: PassCache | None = None,
    meter: ErrorMeter | None = None,
) -> list[torch.Tensor]:
    """Forward every batch; feed the input of each tapped module (path in the block) to its observers.

    ``recorders`` keep whole calls of a module for replay (global batches below their ``max_calls``). With
    ``stop_early`` a batch ends as soon as every tapped module has seen its input (nothing after them is needed),
    and no outputs are returned. Otherwise the outputs of global batches below ``max_outputs`` (all when None) are
    returned. ``max_batches`` limits the pass to global batches below it. Batch numbers are global: on several
    ranks each runs its own batches and the observers' statistics are reduced over ranks at the end, so every rank
    ends with the statistics one process would have collected.
    """
    taps = dict(taps or {})
    fired: set[str] = set()
    fired_ever: set[str] = set()
    handles = []

    def tap_hook(name: str, observers: Sequence):
        def hook(_module: nn.Module, args: tuple) -> None:
            with full_precision(args[0]):
                for observer in observers:
                    observer.add_batch(args[0])
            fired.add(name)
            fired_ever.add(name)
            if stop_early and len(fired) == len(taps):
                raise _StopForward

        return hook

    current = [0]  # the global number of the batch being run

    def record_hook(recorder: CallRecorder):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if current[0] < recorder.max_calls:
                recorder.add_call(args, kwargs)

        return hook

    outputs: list[torch.Tensor] = []
    try:
        for name, observers in taps.items():
            handles.append(block.get_submodule(name).register_forward_pre_hook(tap_hook(name, observers)))
        for name, recorder in (recorders or {}).items():
            handles.append(block.get_submodule(name).register_forward_pre_hook(record_hook(recorder), with_kwargs=True))
        observers = unique_observers(taps)
        previous = -1
        with torch.no_grad():
            for b, hidden, call in data.numbered():
                if max_batches is not None and b >= max_batches:
                    break
                for tokens in data.skipped_tokens(b, previous):  # other ranks' batches: keep random draws aligned
                    for observer in observers:
                        if hasattr(observer, "skip_batch"):
                            observer.skip_batch(tokens)
                current[0], previous = b, b
                fired.clear()
                if meter is not None:
                    meter.begin_batch(b)
                try:
                    with cache.forward_of(b) if cache is not None else nullcontext(), data.computing():
                        out = run_block(block, hidden, call)
                except _StopForward:
                    continue
                if not stop_early and (max_outputs is None or b < max_outputs):
                    outputs.append(out)
    finally:
        for handle in handles:
            handle.remove()
    if data.ranks.distributed and observers:
        # a tapped module no batch of some rank reached would leave that rank without a statistic to reduce (and
        # the others waiting for it): every rank learns it and stops with the same line
        missing = data.ranks.sum_floats([float(len(taps) - len(fired_ever))])[0]
        if missing:
            raise LowbitError(
                f"on {data.ranks.size} ranks, {int(missing)} tapped module(s) were not called on some rank's "
                "calibration batches (data-dependent control flow); calibrate this model on one process"
            )
        for observer in observers:
            observer.reduce(data.ranks)
    return outputs


def unique_observers(taps: Mapping[str, Sequence]) -> list:
    """Each observer once (Linears sharing an input share one), in the same order on every rank."""
    seen: dict[int, object] = {}
    for observers in taps.values():
        for observer in observers:
            seen.setdefault(id(observer), observer)
    return list(seen.values())


def replay(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """Call a module again with recorded arguments; returns its (first) outputs."""
    outputs = []
    with torch.no_grad():
        for args, kwargs in calls:
            out = module(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs
