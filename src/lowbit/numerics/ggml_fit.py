"""llama.cpp's fit of its block grids: each block's step (and offset) from an importance-weighted least-squares
search over candidate steps, instead of from the block's range alone.

For a block of g weights x with importances w (both [..., g]) and a candidate inverse step, every weight gets its
nearest code l; given those codes the step (and offset) that minimise sum w (grid value - x)^2 have a closed form;
the candidate whose fitted grid has the smallest weighted error wins. This is what llama-quantize does
(make_qx_quants for the symmetric types, make_qkx2/3_quants for the ones with a minimum, in ggml-quants.c):

    data-free (no importance)   Q4_K, Q5_K: w = rms(block) + |x|      Q2_K: w = |x|      Q3_K, Q6_K: w = x^2
    with an importance c_j      w = c_j * sqrt(sigma^2 + x^2), sigma^2 the mean x^2 of the row (or 2x that of the
                                256-column super-block, K types)

(llama.cpp's Q6_K weighs by c_j alone and its Q2_K takes sigma^2 without the factor 2; lowbit has the one rule.)
llama.cpp's importance matrix is each input column's mean x_j^2 over calibration tokens; lowbit passes the
diagonal of its calibration Hessian (sum over tokens of x_j^2: the same up to a constant, which no fit sees).

The symmetric fit maps the block's largest-magnitude weight to the code -2**(bits-1), as llama.cpp's Q4_0/Q5_0 do:
its step is signed, so both ends of the codes are used whichever sign that weight has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.numerics.grid import MIN_SCALE, SCALE_DTYPE, symmetric_zero

# (rmin, rdelta, nstep) of make_qkx2/3_quants: candidate inverse steps (nmax + rmin + rdelta * i) / (max - min)
DATA_FREE_SEARCH = {"Q2_K": (-0.5, 0.1, 15), "Q4_K": (-1.0, 0.1, 20), "Q5_K": (-0.5, 0.1, 15)}
IMPORTANCE_SEARCH = (-0.9, 0.05, 36)
SYMMETRIC_TRIES = 9  # make_qx_quants: inverse steps -(nmax + 0.1 * i) / max for i in -9 .. 9


@dataclass(frozen=True)
class Affine:
    """A block grid value = step * l + minimum, l in 0 .. nmax; step >= 0, minimum <= 0; both float32 [...]."""

    step: torch.Tensor
    minimum: torch.Tensor


def weighted_importance(x: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's per-weight importance: column importance [..., g] (broadcast) * sqrt(sigma2 [..., 1] + x^2)."""
    return importance * torch.sqrt(sigma2 + x * x)


def signed_max(x: torch.Tensor) -> torch.Tensor:
    """Each block's largest-magnitude weight with its sign: x [..., g] -> [...]."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def symmetric_search(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed step [...] of each block of x [..., g] under importances w [..., g]: codes l in -nmax .. nmax - 1
    (nmax = 2**(bits-1)) from inverse steps -(nmax + 0.1 i) / signed_max, i in -9..9, each refitted by weighted
    least squares (step = sum w x l / sum w l^2); the one explaining most of sum w x^2 wins. An all-zero block: 0."""
    nmax = symmetric_zero(bits)
    peak = signed_max(x)
    nonzero = peak != 0
    safe_peak = torch.where(nonzero, peak, torch.ones_like(peak)).unsqueeze(-1)
    best_step = torch.zeros_like(peak)
    best_score = torch.full_like(peak, -1.0)
    for i in range(-SYMMETRIC_TRIES, SYMMETRIC_TRIES + 1):
        l = torch.round(x * (-(nmax + 0.1 * i) / safe_peak)).clamp(-nmax, nmax - 1)
        sum_lx = (w * x * l).sum(dim=-1)
        sum_l2 = (w * l * l).sum(dim=-1)
        fitted = sum_l2 > 0
        safe_l2 = torch.where(fitted, sum_l2, torch.ones_like(sum_l2))
        score = torch.where(fitted, sum_lx * sum_lx / safe_l2, torch.full_like(sum_l2, -1.0))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_step = torch.where(better, sum_lx / safe_l2, best_step)
    # no candidate explained anything (an all-zero block, or all-zero importances): the plain signed-max step
    return torch.where(best_score > 0, best_step, peak / -nmax)


def affine_search(x: torch.Tensor, w: torch.Tensor, nmax: int, search: tuple[float, float, int]) -> Affine:
    """Step and minimum of each block of x [..., g] under importances w [..., g] (make_qkx2/3_quants): start from
    the range [min(x, 0), max(x)]; for each candidate inverse step (nmax + rmin + rdelta i) / range take the nearest
    codes, solve the weighted least squares for step and minimum (minimum clamped to <= 0), keep the best."""
    rmin, rdelta, nstep = search
    lo = x.amin(dim=-1).clamp(max=0.0)
    span = x.amax(dim=-1) - lo  # [...]
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    lo_, span_ = lo.unsqueeze(-1), safe_span.unsqueeze(-1)

    def error(step: torch.Tensor, minimum: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return (w * (step.unsqueeze(-1) * l + minimum.unsqueeze(-1) - x) ** 2).sum(dim=-1)

    best_step = span / nmax
    best_min = lo
    l0 = torch.round((x - lo_) * (nmax / span_)).clamp(0, nmax)
    best_err = error(best_step, best_min, l0)
    sum_w, sum_x = w.sum(dim=-1), (w * x).sum(dim=-1)
    for i in range(nstep + 1):
        l = torch.round((x - lo_) * ((nmax + rmin + rdelta * i) / span_)).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * l).sum(dim=-1), (w * l * l).sum(dim=-1), (w * x * l).sum(dim=-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        safe_det = torch.where(solvable, det, torch.ones_like(det))
        step = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        minimum = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        # an offset above zero cannot be stored (the grid's minimum is -dmin * m, m unsigned): refit the step alone
        positive = minimum > 0
        safe_l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
        step = torch.where(positive, sum_xl / safe_l2, step)
        minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
        err = error(step, minimum, l)
        better = solvable & (step > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_min = torch.where(better, minimum, best_min)
    return Affine(best_step, best_min)  # a zero span keeps step 0: no candidate is solvable there


def k_weights(Wg: torch.Tensor, name: str, importance: torch.Tensor | None) -> torch.Tensor:
    """Importances of the weights of a K grid's sub-blocks Wg [out, n_sub, sub]: llama-quantize's data-free ones
    (by type, see the table above) or from the column ``importance`` [n_sub * sub] with sigma^2 = 2x the mean x^2
    of each 256-column super-block."""
    out, n_sub, sub = Wg.shape
    if importance is None:
        if name in ("Q4_K", "Q5_K"):
            return Wg.pow(2).mean(dim=-1, keepdim=True).sqrt() + Wg.abs()
        return Wg.abs() if name == "Q2_K" else Wg * Wg
    per_super = 256 // sub
    sigma2 = 2.0 * Wg.reshape(out, n_sub // per_super, per_super * sub).pow(2).mean(dim=-1)  # [out, n_super]
    sigma2 = sigma2.repeat_interleave(per_super, dim=1).unsqueeze(-1)  # [out, n_sub, 1]
    return weighted_importance(Wg, importance.float().reshape(n_sub, sub), sigma2)


def k_search(name: str, importance: torch.Tensor | None) -> tuple[float, float, int]:
    return IMPORTANCE_SEARCH if importance is not None else DATA_FREE_SEARCH[name]


def symmetric_steps(Wg: torch.Tensor, bits: int, importance: torch.Tensor | None, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's fit of symmetric 32-column-type blocks Wg [out, G, g] -> signed step float32 [out, G], unrounded:
    without importance the signed-max step (Q4_0/Q5_0's reference rounding), with column importances [G, g] the
    weighted search (``sigma2`` [out, 1, 1]: the row's mean x^2). Asymmetric blocks are not fitted here: llama.cpp
    searches Q4_1/Q5_1's float minimum too, but lowbit's zero point is an integer code, and a searched minimum
    rounded onto one is no longer a least-squares fit, so they keep their range (numerics/rtn.py fit_grid)."""
    if importance is None:
        return signed_max(Wg) / -symmetric_zero(bits)
    return symmetric_search(Wg, weighted_importance(Wg, importance, sigma2), bits)


def storable_steps(step: torch.Tensor) -> torch.Tensor:
    """Signed steps [...] as lowbit stores scales: rounded to float16, the sign kept, the magnitude at least
    float16's smallest; a zero step (an all-zero group, which any scale holds): 1."""
    magnitude = step.abs().clamp(min=MIN_SCALE)
    return torch.where(step != 0, torch.copysign(magnitude, step), torch.ones_like(step)).to(SCALE_DTYPE).float()
