"""Run a decoder block over the calibration batches with observers tapped onto some of its modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.pipeline.capture import _StopForward, run_block
from lowbit.pipeline.observers import CallRecorder


@dataclass
class BlockData:
    """One block's calibration inputs: a hidden-state tensor and the recorded call arguments per batch."""

    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]


def run_with_taps(
    block: nn.Module,
    data: BlockData,
    taps: Mapping[str, Sequence] | None = None,
    recorders: Mapping[str, CallRecorder] | None = None,
    stop_early: bool = False,
    max_outputs: int | None = None,
    max_batches: int | None = None,
) -> list[torch.Tensor]:
    """Forward every batch; feed the input of each tapped module (path in the block) to its observers.

    ``recorders`` keep whole calls of a module for replay. With ``stop_early`` a batch ends as soon as every
    tapped module has seen its input (nothing after them is needed), and no outputs are returned. Otherwise
    the outputs of the first ``max_outputs`` batches (all when None) are returned. ``max_batches`` limits the
    pass to the first batches.
    """
    taps = dict(taps or {})
    fired: set[str] = set()
    handles = []

    def tap_hook(name: str, observers: Sequence):
        def hook(_module: nn.Module, args: tuple) -> None:
            for observer in observers:
                observer.add_batch(args[0])
            fired.add(name)
            if stop_early and len(fired) == len(taps):
                raise _StopForward

        return hook

    def record_hook(recorder: CallRecorder):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            recorder.add_call(args, kwargs)

        return hook

    outputs: list[torch.Tensor] = []
    try:
        for name, observers in taps.items():
            handles.append(block.get_submodule(name).register_forward_pre_hook(tap_hook(name, observers)))
        for name, recorder in (recorders or {}).items():
            handles.append(block.get_submodule(name).register_forward_pre_hook(record_hook(recorder), with_kwargs=True))
        with torch.no_grad():
            for hidden, call in list(zip(data.hidden, data.calls))[:max_batches]:
                fired.clear()
                try:
                    out = run_block(block, hidden, call)
                except _StopForward:
                    continue
                if not stop_early and (max_outputs is None or len(outputs) < max_outputs):
                    outputs.append(out)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def replay(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """Call a module again with recorded arguments; returns its (first) outputs."""
    outputs = []
    with torch.no_grad():
        for args, kwargs in calls:
            out = module(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs
