"""The float model's own activations, carried block by block beside the quantized stream for steps that tune a
block toward them (``Needs.float_targets``: AutoRound). Block i's targets are the float block i run on the float
model's inputs to it, not on the quantized stream's: the tuning then also corrects the error the earlier quantized
blocks left in its inputs. Until the first block that asks, both streams are the calibration activations."""

from __future__ import annotations

import torch

from lowbit.pipeline.capture import run_block
from lowbit.pipeline.taps import BlockData


@torch.no_grad()
def float_targets(block: torch.nn.Module, data: BlockData) -> list[torch.Tensor]:
    """The float ``block``'s outputs [batch, seq, hidden] per local calibration batch, from the float stream's inputs
    (the quantized stream's where the float stream has not started); they become the float stream's next inputs."""
    inputs = data.float_hidden if data.float_hidden else data.hidden
    with data.computing():
        outputs = [run_block(block, hidden, call) for hidden, call in zip(inputs, data.calls)]
    data.float_hidden[:] = outputs
    return outputs
