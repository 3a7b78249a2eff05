"""What the output head multiplies: the final norm's outputs on the calibration text, collected after the last
block (its quantized outputs are the inputs of what follows), for rounding the head with GPTQ.

The model runs from ``inputs_embeds`` of zeros with block 0 replaced by a module that returns the last block's
stored outputs for that batch and every other block passing them through, so whatever the model does between its
blocks and its head (final norm, GPT-2's position embeddings are added before block 0 and do not matter) runs as
it does at inference; a pre-hook on the head takes its input and ends the pass (the head itself never runs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.distributed.ranks import Ranks
from lowbit.errors import LowbitError
from lowbit.pipeline.capture import _StopForward
from lowbit.pipeline.observers import HessianObserver


class _Inject(nn.Module):
    """Block 0 returns the stored hidden state of the current batch; the others return what they are given."""

    def __init__(self, box: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.box = box

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.box[0] if self.box is not None else hidden_states


@torch.no_grad()
def head_input_hessian(model: nn.Module, blocks: nn.ModuleList, hidden: list[torch.Tensor], ranks: Ranks) -> torch.Tensor:
    """H = 2 X^T X / n of the head's inputs X over the last block's outputs ``hidden`` (one [batch, seq, hidden]
    tensor per local calibration batch), reduced over ranks."""
    head = model.get_output_embeddings()
    observer = HessianObserver()

    def take(_module: nn.Module, args: tuple) -> None:
        observer.add_batch(args[0])
        raise _StopForward

    box: list[torch.Tensor] = []
    originals = list(blocks)
    handle = head.register_forward_pre_hook(take)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Inject(box if i == 0 else None)
        for h in hidden:
            box[:] = [h]
            try:
                model(inputs_embeds=torch.zeros_like(h), use_cache=False)
            except _StopForward:
                pass
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
                raise LowbitError(
                    f"could not run this {model.config.model_type} model from its last block to its head for GPTQ's head "
                    f"statistics ({type(exc).__name__}: {str(exc)[:120]}); round the head to nearest (an RTN recipe)"
                ) from None
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block
    if ranks.distributed:
        observer.reduce(ranks)
    assert observer.H is not None, "the head saw no input"
    return observer.H
