"""Fold per-channel scales into a block, and prove each fold on the block's own outputs before keeping it.

A fold divides the previous op's output by s (a norm's weight, or a Linear's rows and bias) and multiplies the
next Linears' input columns by s; the block then computes the same function up to float rounding. "The same
function" is not taken on trust from the architecture table: ``prove_fold`` runs the block in float32 on a few
calibration sequences with and without the fold and undoes a fold that changes the output by more than float32
summation order explains (a Gemma (1 + w) norm folded as a plain one, a norm that does not feed those Linears).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.experts import router_matrix
from lowbit.pipeline.capture import run_block
from lowbit.pipeline.taps import BlockData

# Measured on the toy blocks of every architecture in tests/toy.py (random non-zero biases and norm weights, scales
# s ~ exp(N(0, 1.5^2)) in [1e-2, 1e2] and U(0.25, 4.25)): a correct fold changes the float32 output by at most
# 1.6e-7 of its largest value (bfloat16 blocks, proven in float32: 5e-8); wrong folds by 4e-3..5e-1 (a Gemma
# (1 + w) norm folded as w) and 7e-4..9e-2 (a Linear's or LayerNorm's bias left unscaled). 1e-4 sits ~600x above
# the noise, leaving room for the longer sums of real models, and 7x under the mildest wrong fold seen; a fold that
# passes moves the block's output by less than 1e-4 of its largest value, whatever the table got wrong.
FOLD_TOLERANCE = 1e-4
PROBE_SEQUENCES = 2  # calibration sequences a fold is proven on: two block forwards per group on them cost little


def fold_blocker(prev: nn.Module, linears: list[nn.Linear], passengers: list[nn.Module] = ()) -> str:  # type: ignore[assignment]
    """Why scales cannot be folded through ``prev`` into ``linears`` (and float ``passengers``) at all; "" when the
    shapes allow it."""
    if isinstance(prev, nn.Linear):
        width = prev.out_features
    elif isinstance(getattr(prev, "weight", None), torch.Tensor):
        width = prev.weight.shape[0]
    else:
        return f"{type(prev).__name__} has no weight to absorb the scales"
    if any(lin.in_features != width for lin in linears):
        return f"{type(prev).__name__} gives {width} channels, the Linears read {[lin.in_features for lin in linears]}"
    if any(router_matrix(p).shape[1] != width for p in passengers):
        return f"{type(prev).__name__} gives {width} channels, a router reading them does not take {width}"
    return ""


@torch.no_grad()
def fold_scales(
    prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0,
    passengers: list[nn.Module] = (),  # type: ignore[assignment]
) -> None:
    """prev(x) / s and W[:, j] * s_j for each Linear and each float passenger (a router's [E, H] matrix).
    ``prev`` is a Linear (its rows scale) or a norm with a weight (and optionally a bias); ``norm_offset`` = 1
    for norms computing (1 + weight) * x_hat (Gemma)."""
    blocker = fold_blocker(prev, linears, passengers)
    if blocker:
        raise LowbitError(f"cannot fold scales: {blocker}")
    s = s.to(linears[0].weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))  # W_prev [out = len(s), in]: rows
    else:
        weight = prev.weight.float()
        prev.weight.copy_(((weight + norm_offset) / s - norm_offset).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))  # W [out, in]: columns
    for passenger in passengers:
        matrix = router_matrix(passenger)  # [E, in]: columns
        matrix.mul_(s.to(matrix.dtype).unsqueeze(0))


def snapshot(modules: list[nn.Module]) -> Callable[[], None]:
    """A function that puts the modules' current parameters back bit for bit (the undo of a refused fold)."""
    saved = [(p, p.detach().clone()) for m in modules for p in m.parameters()]  # a router's matrix may sit in a child

    @torch.no_grad()
    def restore() -> None:
        for param, value in saved:
            param.copy_(value)

    return restore


@dataclass(frozen=True)
class Probe:
    """The few calibration sequences folds are proven on, in float32: hidden [n, seq, hidden] and the block call."""

    hidden: torch.Tensor
    call: tuple[tuple, dict]


def probe_from(data: BlockData, n_sequences: int = PROBE_SEQUENCES) -> Probe:
    """The first ``n_sequences`` of the block's first calibration batch. Call arguments with that batch's size as
    their leading dimension (masks [B, 1, L, L], position ids [B, L]) are cut with it; broadcast ones ([1, ...])
    and 1-d ones (cache positions) are kept whole. On several ranks only rank 0's probe is used (its first batch
    is global batch 0, as in one process: transforms.fold_proven)."""
    hidden = data.hidden[0]
    batch = hidden.shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value[:n_sequences] if value.dim() >= 2 and value.shape[0] == batch else value
            return value.float() if value.is_floating_point() else value
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return Probe(cut(hidden), cut(data.calls[0]))


@contextmanager
def float32_parameters(block: nn.Module) -> Iterator[None]:
    """Run ``block`` in float32 inside the context: half-precision parameters and buffers are widened, then
    narrowed back to their own dtypes (exact for every value not changed inside)."""
    narrow = [(t, t.dtype) for t in (*block.parameters(), *block.buffers())
              if t.is_floating_point() and t.dtype != torch.float32]
    for tensor, _ in narrow:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in narrow:
            tensor.data = tensor.data.to(dtype)


@contextmanager
def highest_matmul_precision() -> Iterator[None]:
    """Full float32 matmuls inside the context, whatever the caller set: TF32 (precision "high" on CUDA) rounds
    matmul inputs to 10 mantissa bits (~5e-4 relative), ten times the tolerance, and would refuse correct folds."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    """max |after - before| / max |before|: the fold's change to the output, relative to the output's scale."""
    scale = before.abs().max().item()
    change = (after - before).abs().max().item()
    return change / scale if scale > 0 else (0.0 if change == 0 else math.inf)


@dataclass(frozen=True)
class FoldProof:
    change: float  # relative_change of the block's float32 output on the probe (NaN: the output was not finite)
    tolerance: float

    @property
    def holds(self) -> bool:
        return self.change <= self.tolerance  # False for NaN


@torch.no_grad()
def prove_fold(
    block: nn.Module, probe: Probe, apply: Callable[[], None], undo: Callable[[], None],
    tolerance: float = FOLD_TOLERANCE,
) -> FoldProof:
    """``apply`` a fold to ``block`` and keep it only if the block's float32 output on ``probe`` stays within
    ``tolerance``; otherwise ``undo`` it (the block is then exactly as before). Costs two block forwards on the
    probe: the output before is recomputed each time because an earlier kept fold, narrowed back to a half
    precision, moved it by rounding."""
    with float32_parameters(block), highest_matmul_precision():
        before = run_block(block, probe.hidden, probe.call)
        apply()
        after = run_block(block, probe.hidden, probe.call)
        change = relative_change(after, before) if torch.isfinite(after).all() else math.nan
        proof = FoldProof(change, tolerance)
        if not proof.holds:
            undo()
    return proof
