"""Capture what every decoder block is called with, running only the embeddings.

Each block is swapped for a recorder that stores its positional/keyword arguments (attention masks, rotary
tables, ...; per block, since e.g. Gemma 3 alternates sliding and global attention) and passes the hidden state
through. Block 0's hidden states are the calibration activations. The last recorder stops the forward pass with
a private exception, so the final norm and the LM head never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised inside a forward pass to end it early; never escapes lowbit."""


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockCalls:
    """How each block is called: per block, per calibration batch, (args after hidden_states, kwargs)."""

    hidden: list[torch.Tensor]  # block-0 inputs, one [batch, seq, hidden] tensor per calibration batch
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)  # [block][batch]
    # the float model's own inputs to the current block, per batch, where a step asks for them (Needs.float_targets;
    # pipeline/float_stream.py); empty until then: up to the first block that asks, the two streams are one
    float_hidden: list[torch.Tensor] = field(default_factory=list)


class _Recorder(nn.Module):
    def __init__(self, index: int, last: int, calls: BlockCalls) -> None:
        super().__init__()
        self.index, self.last, self.store = index, last, calls

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.store.hidden.append(hidden_states.detach())
        kwargs.pop("past_key_values", None)
        if "use_cache" in kwargs:  # only where the model passes it: some blocks (GPT-1) take no such argument
            kwargs["use_cache"] = False
        self.store.calls[self.index].append((args, kwargs))
        if self.index == self.last:
            raise _StopForward
        return hidden_states


def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int, device: torch.device | str,
    batches: list[int] | None = None,
) -> BlockCalls:
    """Run ``ids`` [N, L] through the embeddings in batches and record every block's inputs; ``batches`` names the
    batches to run (global numbers: batch b is ids[b * batch_size : (b + 1) * batch_size]; None: all)."""
    calls = BlockCalls(hidden=[], calls=[[] for _ in blocks])
    originals = list(blocks)
    last = len(blocks) - 1
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, last, calls)
        with torch.no_grad():
            for b in batches if batches is not None else range(len(range(0, ids.shape[0], batch_size))):
                start = b * batch_size
                try:
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return calls


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One block forward with its recorded arguments; returns the hidden state (older blocks return tuples)."""
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out  # GPT-1 blocks return a list
