"""The integer grid shared by every weight method: fit scale/zero from a range, round, and map back.

Codes are always unsigned (0 .. 2**bits - 1) with ``w_hat = (q - zero) * scale``. Symmetric (absmax) grids use
the fixed zero ``2**(bits-1)`` and ``scale = absmax / (2**(bits-1) - 1)`` so that +-absmax are exact grid
points. Asymmetric grids stretch ``[min(w, 0), max(w, 0)]`` over all levels with an integer zero point, so 0.0 is
always exactly representable (pruned weights stay zero after rounding).
Scales are rounded to float16 when fitted, as they are stored, so fake-quant and packed weights agree bit for
bit.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-24  # the smallest positive float16


def group_count(columns: int, group_size: int) -> int:
    """Groups of ``group_size`` consecutive columns covering ``columns`` (a last partial group counts)."""
    return -(-columns // group_size)


def grouped(M: torch.Tensor, group_size: int) -> torch.Tensor:
    """M [rows, n] -> [rows, n_groups, group_size], a last partial group zero-padded: zeros change no absmax, no
    range that includes 0 (every asymmetric one does) and no error weighted by them."""
    rows, n = M.shape
    n_groups = group_count(n, group_size)
    return torch.nn.functional.pad(M, (0, n_groups * group_size - n)).view(rows, n_groups, group_size)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
    return 1 << (bits - 1)


def fit_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool, storable: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters for ranges [wmin, wmax] (any shape, float). Returns (scale, zero) as float32 tensors.

    ``zero`` holds integer values. With ``storable`` the scale is rounded to float16 precision, as weights'
    scales are stored; activation scales computed at run time pass ``storable=False``.
    """
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        scale = absmax / (symmetric_zero(bits) - 1)
    else:
        lo = torch.clamp(wmin, max=0.0)
        scale = (torch.clamp(wmax, min=0.0) - lo) / max_code(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero range: any scale works
    if storable:
        scale = scale.clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()
    if symmetric:
        zero = torch.full_like(scale, float(symmetric_zero(bits)))
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, max_code(bits))
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes q = clamp(round(w / scale) + zero) (same shape as w; scale/zero broadcast)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w -> its grid value (q - zero) * scale, computed in float32 and returned in w's dtype."""
    wf = w.float()
    return ((round_to_grid(wf, scale, zero, bits) - zero) * scale).to(w.dtype)
