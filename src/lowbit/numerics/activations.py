"""Activation quantization (seed 003): dynamic (range measured on every input) or static (calibrated once).

Per-token ranges follow each row of x [tokens, features]; per-tensor ranges are one number for the whole input,
which a single outlier channel stretches so far that ordinary values round to zero.
"""

from __future__ import annotations

import torch

from lowbit.numerics.grid import fit_scale_zero, max_code, symmetric_zero


def _range(xf: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x [..., features]: per row ([..., 1]) or over the whole tensor (scalars)."""
    if per_token:
        return xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    return xf.amin(), xf.amax()


def quantize_activations(
    x: torch.Tensor, bits: int, per_token: bool, symmetric: bool, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize x [..., features]; returns x's grid values in x's dtype.

    ``static_scale`` (a calibrated per-tensor symmetric scale) replaces the dynamic range measurement.
    """
    if symmetric or static_scale is not None:
        codes, scale = symmetric_activation_codes(x, bits, per_token, static_scale)
        return codes.mul_(scale).to(x.dtype)
    xf = x.float()
    scale, zero = fit_scale_zero(*_range(xf, per_token), bits, symmetric, storable=False)
    return _codes_in_place(xf / scale, zero, bits).sub_(zero).mul_(scale).to(x.dtype)


def _codes_in_place(q: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``round_to_grid``'s codes clamp(round(q) + zero, 0, 2**bits - 1), computed in q's own memory: the same ops in
    the same order (the same bits), without a new [tokens, features] tensor per op. Inputs are quantized in every
    forward of a W8A8 model, and there the allocations, not the arithmetic, were most of the cost
    (bench/eval_overhead.py)."""
    return q.round_().add_(zero).clamp_(0, max_code(bits))


def static_scale_from_absmax(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric per-tensor scale that maps the calibrated absmax onto the largest code."""
    scale, _ = fit_scale_zero(-absmax, absmax, bits, symmetric=True, storable=False)
    return scale


def symmetric_activation_codes(
    x: torch.Tensor, bits: int, per_token: bool, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers behind ``quantize_activations(x, bits, per_token, symmetric=True, static_scale)``: signed codes
    (float, in [-2**(bits-1), 2**(bits-1) - 1]) shaped like x [..., features] and the scale ([..., 1] per token,
    a scalar otherwise), with codes * scale equal to the fake-quantized x."""
    xf = x.float()
    zero = torch.tensor(float(symmetric_zero(bits)), device=x.device)
    if static_scale is not None:
        scale = static_scale.float()
    else:
        scale, zero = fit_scale_zero(*_range(xf, per_token), bits, True, storable=False)
    return _codes_in_place(xf / scale, zero, bits).sub_(zero), scale
