"""AutoRound's learnable rounding (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent"): each
weight is rounded as ``round(w / scale + v)`` with a learned offset ``v`` in [-0.5, 0.5] instead of 0, and each
group's range is shrunk by learned factors in [0, 1] (``lo`` for its minimum, ``hi`` for its maximum) before the
scale is fitted. The block-level training that learns them is in methods/autoround.py; here are the pure
functions: the differentiable fake quantization the training runs (round with a straight-through gradient), and
the QWeight it ends in, whose values are the training's forward values exactly (the same float16 scale rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.methods.base import WeightQuant
from lowbit.numerics.grid import MIN_SCALE, SCALE_DTYPE, fit_scale_zero, group_count, max_code, symmetric_zero
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import group_size_for, weight_ranges


@dataclass
class Rounding:
    """What AutoRound learns for one Linear of W [out, in]: ``offset`` v [out, in]; ``lo``, ``hi`` [out or 1,
    n_groups] (a symmetric grid uses ``hi`` alone, on its absmax)."""

    offset: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def initial(cls, W: torch.Tensor, spec: WeightQuant) -> Rounding:
        """Round to nearest over the full range: v = 0, lo = hi = 1."""
        wmin, _ = weight_ranges(W, spec)
        return cls(torch.zeros_like(W, dtype=torch.float32), torch.ones_like(wmin), torch.ones_like(wmin))

    def tensors(self) -> list[torch.Tensor]:
        return [self.offset, self.lo, self.hi]

    def detached(self) -> Rounding:
        return Rounding(*(t.detach().clone() for t in self.tensors()))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _grid(W: torch.Tensor, spec: WeightQuant, r: Rounding) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out or 1, n_groups] of the shrunk ranges, as ``fit_scale_zero`` fits them (float16 scale,
    integer zero), with straight-through gradients to ``lo`` and ``hi``."""
    wmin, wmax = weight_ranges(W, spec)
    if spec.symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs()) * r.hi
        scale = absmax / (symmetric_zero(spec.bits) - 1)
    else:
        lo = torch.clamp(wmin, max=0.0) * r.lo
        scale = (torch.clamp(wmax, min=0.0) * r.hi - lo) / max_code(spec.bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = scale.detach().clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()
    scale = scale + (stored - scale).detach()  # the stored float16 value forward
    if spec.symmetric:
        return scale, torch.full_like(scale, float(symmetric_zero(spec.bits)))
    return scale, torch.clamp(_round_ste(-lo / scale), 0, max_code(spec.bits))


def _per_column(t: torch.Tensor, gs: int, n: int) -> torch.Tensor:
    """[rows, n_groups] -> [rows, n]: each column its group's value."""
    return t.repeat_interleave(gs, dim=1)[:, :n]


def fake_quantize_tuned(W: torch.Tensor, spec: WeightQuant, r: Rounding) -> torch.Tensor:
    """W [out, in] on its grid under the learned rounding, differentiable in ``r`` (float32)."""
    n = W.shape[1]
    gs = group_size_for(spec, n)
    scale, zero = (_per_column(t, gs, n) for t in _grid(W, spec, r))
    codes = torch.clamp(_round_ste(W / scale + r.offset) + zero, 0, max_code(spec.bits))
    return (codes - zero) * scale


def tuned_qweight(W: torch.Tensor, spec: WeightQuant, r: Rounding) -> QWeight:
    """The QWeight of W [out, in] under the learned rounding: its dequantization is ``fake_quantize_tuned``'s
    forward value."""
    W = W.float()
    n = W.shape[1]
    gs = group_size_for(spec, n)
    wmin, wmax = weight_ranges(W, spec)
    if spec.symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs()) * r.hi
        scale, zero = fit_scale_zero(-absmax, absmax, spec.bits, True)
    else:
        scale, zero = fit_scale_zero(torch.clamp(wmin, max=0.0) * r.lo, torch.clamp(wmax, min=0.0) * r.hi,
                                     spec.bits, False)
    codes = torch.clamp(torch.round(W / _per_column(scale, gs, n) + r.offset) + _per_column(zero, gs, n), 0,
                        max_code(spec.bits))
    assert group_count(n, gs) == scale.shape[1]
    return QWeight(codes.to(torch.uint8), scale.half(), None if spec.symmetric else zero.to(torch.uint8), spec.bits, gs)


def sign_step(r: Rounding, lr: float, range_lr: float) -> None:
    """One signed-gradient descent step (in place), offsets kept in [-0.5, 0.5] and ranges in [0, 1]; gradients
    cleared."""
    with torch.no_grad():
        for t, rate in ((r.offset, lr), (r.lo, range_lr), (r.hi, range_lr)):
            if t.grad is not None:
                t.sub_(rate * torch.sign(t.grad))
                t.grad = None
        r.offset.clamp_(-0.5, 0.5)
        r.lo.clamp_(0.0, 1.0)
        r.hi.clamp_(0.0, 1.0)
