"""Activation quantization (seed 003): dynamic (range measured on every input) or static (calibrated once).

Per-token ranges follow each row of x [tokens, features]; per-tensor ranges are one number for the whole input,
which a single outlier channel stretches so far that ordinary values round to zero.
"""

from __future__ import annotations

import torch

from lowbit.numerics.grid import fake_quantize, fit_scale_zero, round_to_grid, symmetric_zero


def quantize_activations(
    x: torch.Tensor, bits: int, per_token: bool, symmetric: bool, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize x [..., features]; returns x's grid values in x's dtype.

    ``static_scale`` (a calibrated per-tensor symmetric scale) replaces the dynamic range measurement.
    """
    xf = x.float()
    if static_scale is not None:
        zero = torch.tensor(float(symmetric_zero(bits)), device=x.device)
        return fake_quantize(xf, static_scale.float(), zero, bits).to(x.dtype)
    if per_token:
        lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)  # [..., 1]
    else:
        lo, hi = xf.amin(), xf.amax()
    scale, zero = fit_scale_zero(lo, hi, bits, symmetric, storable=False)
    return fake_quantize(xf, scale, zero, bits).to(x.dtype)


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
        lo, hi = (xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)) if per_token else (xf.amin(), xf.amax())
        scale, zero = fit_scale_zero(lo, hi, bits, True, storable=False)
    return round_to_grid(xf, scale, zero, bits) - zero, scale
