"""The float formats serving engines run, as element codes and block scales: FP8 (E4M3), MXFP4 and NVFP4.

    type   element              block   block scale                     tensor scale   bits per weight
    FP8    E4M3 (max 448)       grid's  float32 (per tensor/channel/group)  -           8 (+ scales)
    MXFP4  E2M1 (max 6)         32      E8M0: a power of two (one byte)  -              4.25
    NVFP4  E2M1 (max 6)         16      E4M3 (one byte)                  float32        4.5

E2M1 holds 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; a code is ``sign << 3 | index`` into that list (the
layout compressed-tensors and vLLM pack two to a byte). Rounding is to nearest, ties to the even mantissa, values
past the largest saturating to it: for E4M3 PyTorch's own float8_e4m3fn cast, for E2M1 the thresholds below.

The block scales are chosen as compressed-tensors (0.20) and vLLM's reference choose them, so lowbit's
round-to-nearest weights are theirs bit for bit (tests/test_float_formats.py checks this against compressed-tensors'
own fake quantization):
  * FP8: absmax / 448.
  * MXFP4: 2**(e - 2) where 2**e is the block's absmax rounded to a power of two (up when its mantissa is 1.75 or
    more, else down), so the absmax lands in [3.5, 7) element units and at most the top half-step saturates.
  * NVFP4: one float32 ``global`` = 448 * 6 / absmax(tensor) per tensor, and per block the E4M3 number nearest to
    absmax(block) / 6 * global; the block's step is that number / global (what every reader computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_SUBNORMAL = 2.0**-9
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MX_EXPONENT_LIMIT = 127  # E8M0 holds 2**-127 .. 2**127 (and a NaN code, never written)


@dataclass(frozen=True)
class FloatType:
    """One float format: element ``bits`` (8: E4M3, 4: E2M1), the fixed ``block`` of columns sharing a scale (0:
    the grid's granularity decides, FP8) and how that scale is stored."""

    name: str
    bits: int
    block: int
    scale_storage: str  # "float32" | "e8m0" | "e4m3"

    @property
    def element_max(self) -> float:
        return E4M3_MAX if self.bits == 8 else E2M1_MAX

    @property
    def has_global_scale(self) -> bool:
        return self.scale_storage == "e4m3"


FLOAT_TYPES = {
    "FP8": FloatType("FP8", 8, 0, "float32"),
    "MXFP4": FloatType("MXFP4", 4, 32, "e8m0"),
    "NVFP4": FloatType("NVFP4", 4, 16, "e4m3"),
}


def element_codes(x: torch.Tensor, ft: FloatType) -> torch.Tensor:
    """uint8 codes of x (float32, already divided by its step) rounded to the nearest element, saturating."""
    if ft.bits == 8:
        return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    a = x.abs()
    # index into _E2M1_VALUES: count the midpoints passed; a tie goes to the even mantissa (0, 1, 2, 4)
    index = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    sign = ((x < 0) & (index > 0)).to(torch.uint8) << 3
    return (index | sign).to(torch.uint8)


def _round_to_float_(x: torch.Tensor, mantissa_bits: int, min_exponent: int) -> torch.Tensor:
    """x (float32) rounded in place to the nearest value, ties to even, of a float format with ``mantissa_bits`` and
    normal exponents from ``min_exponent`` (below it, subnormals on that binade's step), not saturated. A binade
    [2^e, 2^(e+1)) holds steps of 2^(e - mantissa_bits): x is divided by that power of two (built from x's own
    float32 exponent bits, so exactly), rounded to an integer half to even, and multiplied back; a zero keeps its
    sign. Inputs are rounded in every forward: this is a few passes over x, where PyTorch's float8 cast back to
    float32, and E2M1's comparisons and table, were not vectorized."""
    exponent = (x.view(torch.int32) & 0x7F800000).clamp_(min=(127 + min_exponent) << 23)  # biased, in place
    step = exponent.sub_(mantissa_bits << 23).view(torch.float32)  # [same shape] 2^(e - bits)
    return x.div_(step).round_().mul_(step)


def round_e4m3_(x: torch.Tensor) -> torch.Tensor:
    """x (float32, already divided by its step) rounded to E4M3 in its own memory: the values of ``element_codes``'
    FP8 codes bit for bit (the float8_e4m3fn cast's round to nearest even, saturating at 448, a negative value
    rounding to zero giving -0), without a new tensor per op (inputs are rounded in every forward)."""
    return _round_to_float_(x, 3, -6).clamp_(-E4M3_MAX, E4M3_MAX)


def round_e2m1_(x: torch.Tensor) -> torch.Tensor:
    """x (float32, already divided by its step) rounded to E2M1 in its own memory: the values of ``element_codes``'
    FP4 codes bit for bit (ties to the even mantissa, saturating at 6, a zero always +0), without the seven
    comparisons and the table lookup."""
    return _round_to_float_(x, 1, 0).clamp_(-E2M1_MAX, E2M1_MAX).add_(0.0)  # + 0.0 turns -0 into +0 (the codes')


def abs_max(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """max |x| over the last dimension, as ``x.abs().amax(-1)`` gives it, faster on the CPU: a block shorter than 32
    (NVFP4's 16) as a max pool over each row's blocks (PyTorch's reduction over so short a last dimension took 3x
    as long), a longer one from its largest and smallest values (no |x| tensor)."""
    n = x.shape[-1]
    if n >= 32 or x.dim() < 2:
        return torch.maximum(x.amax(dim=-1, keepdim=keepdim), x.amin(dim=-1, keepdim=keepdim).neg_()).abs_()
    rows = x.reshape(-1, 1, x.shape[-2] * n).abs()  # [rows, 1, blocks * n]: one pooling window per block
    out = torch.nn.functional.max_pool1d(rows, n).view(x.shape[:-1])
    return out.unsqueeze(-1) if keepdim else out


def element_values(codes: torch.Tensor, ft: FloatType) -> torch.Tensor:
    """float32 values of uint8 element codes."""
    if ft.bits == 8:
        return codes.view(torch.float8_e4m3fn).float()
    table = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), device=codes.device)
    return torch.take(table, codes.long())  # the same gather as table[codes], faster on the CPU


def mx_exponents(absmax: torch.Tensor) -> torch.Tensor:
    """Unbiased E8M0 exponents (int32, same shape) of MXFP4 blocks with these float32 absmaxes: the absmax rounded
    to a power of two at E2M1's one mantissa bit (adding a quarter of its leading power, then dropping the
    mantissa), minus 2 = floor(log2(6)). An all-zero block gets 2**0."""
    bits = absmax.float().contiguous().view(torch.int32)
    power = (bits + (1 << 21)) & ~((1 << 23) - 1)  # 1 << 21: a quarter of the 23-bit mantissa; mask it off
    exponent = (power >> 23) - 127 - 2
    exponent = torch.where(absmax > 0, exponent, torch.zeros_like(exponent))
    return exponent.clamp(-_MX_EXPONENT_LIMIT, _MX_EXPONENT_LIMIT)


def global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor float32 scale [1] for a tensor of this absmax: 448 * 6 / absmax (1 for an all-zero one)."""
    absmax = absmax.float().reshape(1)
    return torch.where(absmax > 0, E4M3_MAX * E2M1_MAX / absmax, torch.ones_like(absmax))


def block_scales(
    absmax: torch.Tensor, ft: FloatType, global_: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, step) of blocks with these absmaxes (float32, any shape): ``stored`` as the format keeps it
    (float32, uint8 E8M0 biased exponents, or float8_e4m3fn), ``step`` the float32 number each element code is
    multiplied by. ``global_`` [1]: NVFP4's tensor scale."""
    absmax = absmax.float()
    if ft.scale_storage == "float32":
        step = torch.where(absmax > 0, absmax / ft.element_max, torch.ones_like(absmax))
        return step, step
    if ft.scale_storage == "e8m0":
        exponent = mx_exponents(absmax)
        return (exponent + 127).to(torch.uint8), torch.exp2(exponent.float())
    assert global_ is not None, "NVFP4 blocks are scaled relative to their tensor's global scale"
    scaled = (absmax / E2M1_MAX * global_).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX)  # an all-zero block: any step works
    stored = scaled.to(torch.float8_e4m3fn)
    return stored, stored_steps(stored, ft, global_)


def stored_steps(stored: torch.Tensor, ft: FloatType, global_: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 steps of stored block scales (inverse of ``block_scales``' first output)."""
    if ft.scale_storage == "float32":
        return stored.float()
    if ft.scale_storage == "e8m0":
        return torch.exp2(stored.to(torch.int32).float() - 127)
    assert global_ is not None
    return stored.float() / global_.float()


def fake_quantize_blocks(x: torch.Tensor, absmax: torch.Tensor, ft: FloatType, global_: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n_blocks, block] on the grid its blocks' ``absmax`` [..., n_blocks] give (float32)."""
    _, step = block_scales(absmax, ft, global_)
    step = step.unsqueeze(-1)
    scaled = x.float() / step
    rounded = round_e2m1_(scaled) if ft.bits == 4 else round_e4m3_(scaled)  # element_values(element_codes(scaled))
    return rounded.mul_(step)
