"""llama.cpp's K-quant grids (Q2_K .. Q6_K) as lowbit weight grids: lowbit's methods round onto them, and the GGUF
export stores the codes they chose without rounding anything again.

A row is cut into super-blocks of 256 columns, each into sub-blocks of 16 or 32 columns. Every sub-block has its
own step (and, in the asymmetric types, its own offset), stored as small integers ``sc`` (``m``) times one float16
``d`` (``dmin``) per super-block:

    asymmetric  Q2_K, Q4_K, Q5_K:  w = (d * sc) * q - (dmin * m)        q in 0 .. 2**bits - 1, sc and m unsigned
    symmetric   Q3_K, Q6_K:        w = (d * sc) * (q - 2**(bits - 1))   sc signed

    type  bits  sub-block  sc / m     bytes per 256 columns  bits per weight
    Q2_K  2     16         4-bit      84                     2.625
    Q3_K  3     16         6-bit      110                    3.4375
    Q4_K  4     32         6-bit      144                    4.5
    Q5_K  5     32         6-bit      176                    5.5
    Q6_K  6     16         8-bit      210                    6.5625

The values are computed in float32 exactly as GGML dequantizes them (``d * sc`` first), so lowbit's fake-quant
weight, its saved checkpoint and the GGUF file hold the same numbers (tests/test_kquant.py checks this against the
gguf package's own dequantization). A width that is not a multiple of 256 cannot hold K blocks; llama-quantize then
uses a 32-column type instead, and so does lowbit (``fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.ggml_fit import affine_search, k_search, k_weights, symmetric_search
from lowbit.numerics.grid import SCALE_DTYPE, max_code, symmetric_zero
from lowbit.numerics.packing import pack_bits, unpack_bits
from lowbit.numerics.qweight import CodesShape

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KType:
    """One K-quant type: code ``bits``, ``sub`` columns per sub-block, ``sub_bits`` per stored sc (and m)."""

    name: str
    bits: int
    sub: int
    sub_bits: int
    asymmetric: bool
    # llama-quantize's type for a tensor whose width is not a multiple of 256, as lowbit's (bits, symmetric) over
    # 32-column groups: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (llama.cpp's
    # tensor_type_fallback; releases before it gave Q2_K and Q3_K the non-uniform IQ4_NL, which lowbit does not have)
    fallback: tuple[int, bool]

    @property
    def sub_blocks(self) -> int:
        return SUPER_BLOCK // self.sub

    @property
    def max_sc(self) -> int:
        """Largest |sc|: unsigned 2**sub_bits - 1, or signed 2**(sub_bits - 1) - 1 (its negative end left unused)."""
        return max_code(self.sub_bits) if self.asymmetric else symmetric_zero(self.sub_bits) - 1


K_TYPES = {
    "Q2_K": KType("Q2_K", 2, 16, 4, True, (4, True)),
    "Q3_K": KType("Q3_K", 3, 16, 6, False, (4, True)),
    "Q4_K": KType("Q4_K", 4, 32, 6, True, (5, True)),
    "Q5_K": KType("Q5_K", 5, 32, 6, True, (5, False)),
    "Q6_K": KType("Q6_K", 6, 16, 8, False, (8, True)),
}
FALLBACK_GROUP = 32


def k_type(name: str) -> KType:
    try:
        return K_TYPES[name.upper()]
    except KeyError:
        raise LowbitError(f"unknown K-quant type {name!r}; pick one of {', '.join(K_TYPES)}") from None


@dataclass
class KParams:
    """The stored grid of a [out, n] weight: d, dmin float16 [out, n / 256]; sc, m int8 [out, n / sub]."""

    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None
    m: torch.Tensor | None

    def step(self, kt: KType) -> torch.Tensor:
        """Per sub-block step d * sc, float32 [out, n_sub] (exact: an 11-bit d times an 8-bit sc)."""
        return self.d.float().repeat_interleave(kt.sub_blocks, dim=1) * self.sc.float()

    def offset(self, kt: KType) -> torch.Tensor | None:
        """Per sub-block offset dmin * m, float32 [out, n_sub], or None for the symmetric types."""
        if self.dmin is None or self.m is None:
            return None
        return self.dmin.float().repeat_interleave(kt.sub_blocks, dim=1) * self.m.float()

    def per_column(self, kt: KType) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each column's step and offset (None: symmetric), float32 [out, n]."""
        offset = self.offset(kt)
        return (self.step(kt).repeat_interleave(kt.sub, dim=1),
                offset.repeat_interleave(kt.sub, dim=1) if offset is not None else None)


def _sub_block_view(W: torch.Tensor, kt: KType) -> torch.Tensor:
    out, n = W.shape
    if n % SUPER_BLOCK:
        raise LowbitError(f"{kt.name} needs a width divisible by {SUPER_BLOCK}, got {n}; use its fallback grid")
    return W.float().reshape(out, n // kt.sub, kt.sub)  # [out, n_sub, sub]


def _super_scale(per_sub: torch.Tensor, kt: KType, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per-sub-block values [out, n_sub] (>= 0 unless symmetric) to float16 d per super-block times an
    integer in -limit .. limit: (d float16 [out, n_super], integer int8 [out, n_sub])."""
    out, n_sub = per_sub.shape
    grouped = per_sub.reshape(out, n_sub // kt.sub_blocks, kt.sub_blocks)  # [out, n_super, sub_blocks]
    d = (grouped.abs().amax(dim=-1) / limit).to(SCALE_DTYPE)  # [out, n_super]
    df = d.float().unsqueeze(-1)
    safe = torch.where(df > 0, df, torch.ones_like(df))
    integer = torch.where(df > 0, torch.round(grouped / safe), torch.zeros_like(grouped)).clamp(-limit, limit)
    return d, integer.reshape(out, n_sub).to(torch.int8)


def fit_kparams(W: torch.Tensor, kt: KType, importance: torch.Tensor | None = None) -> KParams:
    """The K grid of W [out, n] (n divisible by 256), fitted as llama-quantize fits it (numerics/ggml_fit.py):
    each sub-block's step (and minimum) by a weighted least-squares search, data-free or under the columns'
    ``importance`` [n] (an importance matrix: calibration mean x_j^2, or a Hessian's diagonal).

    The steps (and -minimums) are then stored as sub_bits integers sc (m) times the super-block's float16 d (dmin),
    its largest over 2**sub_bits - 1 (symmetric: 2**(sub_bits-1) - 1, signed). A non-zero step that rounds to
    sc = 0 is given sc = +-1, so the sub-block still has a grid. Symmetric types map the sub-block's
    largest-magnitude weight toward the code -2**(bits-1), as llama.cpp does (both ends of the codes used)."""
    Wg = _sub_block_view(W, kt)  # [out, n_sub, sub]
    weights = k_weights(Wg, kt.name, importance)
    if kt.asymmetric:
        fit = affine_search(Wg, weights, max_code(kt.bits), k_search(kt.name, importance))
        d, sc = _super_scale(fit.step, kt, kt.max_sc)
        sc = torch.where((sc == 0) & (fit.step > 0), torch.ones_like(sc), sc)
        dmin, m = _super_scale(-fit.minimum, kt, kt.max_sc)
        return KParams(d, sc, dmin, m)
    step = symmetric_search(Wg, weights, kt.bits)  # [out, n_sub], signed
    d, sc = _super_scale(step, kt, kt.max_sc)
    sc = torch.where((sc == 0) & (step != 0), torch.sign(step).to(sc.dtype), sc)  # as the asymmetric types: a grid
    return KParams(d, sc, None, None)


def round_k(W: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, kt: KType) -> torch.Tensor:
    """Float codes of W [out, cols] on per-column step / offset [out, cols] (llama.cpp: nearest((w + offset) / step));
    a zero step gives the code of value 0 (symmetric) or of -offset (asymmetric)."""
    nonzero = step != 0
    safe = torch.where(nonzero, step, torch.ones_like(step))
    if offset is None:
        zero = float(symmetric_zero(kt.bits))
        code = torch.where(nonzero, torch.round(W / safe) + zero, torch.full_like(W, zero))
    else:
        code = torch.where(nonzero, torch.round((W + offset) / safe), torch.zeros_like(W))
    return code.clamp(0, max_code(kt.bits))


def k_values(code: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, kt: KType) -> torch.Tensor:
    """The grid values of float codes, in GGML's float32 order: step * q - offset, or step * (q - zero)."""
    if offset is None:
        return step * (code - symmetric_zero(kt.bits))
    return step * code - offset


@dataclass
class KQWeight(CodesShape):
    """A weight on a K-quant grid: codes uint8 [out, in] plus its KParams; the counterpart of QWeight (same
    ``dequantize`` / ``pack`` / ``unpack`` role) for the two-level grid. It has no per-group ``scale``/``zero``:
    code that needs those (compressed-tensors, the GPTQ format, PyTorch's int4 kernel) refuses K grids first."""

    codes: torch.Tensor
    params: KParams
    kind: str

    g_idx = None  # K blocks are always in column order

    @property
    def ktype(self) -> KType:
        return K_TYPES[self.kind]

    @property
    def bits(self) -> int:
        return self.ktype.bits

    @property
    def group_size(self) -> int:
        return self.ktype.sub

    @property
    def symmetric(self) -> bool:
        return not self.ktype.asymmetric

    @property
    def groups_in_order(self) -> bool:
        return True

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        step, offset = self.params.per_column(self.ktype)  # [out, in]
        return k_values(self.codes.float(), step, offset, self.ktype).to(dtype)

    def pack(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_bits(self.codes, self.bits), "kd": self.params.d, "ksc": self.params.sc}
        if self.params.dmin is not None and self.params.m is not None:
            out.update(kdmin=self.params.dmin, km=self.params.m)
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], kind: str, in_features: int) -> KQWeight:
        kt = K_TYPES[kind]
        try:
            codes = unpack_bits(tensors["qweight"], kt.bits, in_features)
            params = KParams(tensors["kd"], tensors["ksc"], tensors.get("kdmin"), tensors.get("km"))
        except KeyError as exc:
            raise LowbitError(f"packed weight is missing tensor {exc}; the checkpoint is incomplete") from None
        if kt.asymmetric and (params.dmin is None or params.m is None):
            raise LowbitError(f"packed {kind} weight lacks its mins (kdmin, km); the checkpoint is incomplete")
        return cls(codes, params, kind)


def k_rtn(W: torch.Tensor, kt: KType, importance: torch.Tensor | None = None) -> KQWeight:
    """Round W [out, in] to the nearest point of its K grid (fitted under the columns' ``importance`` [in])."""
    params = fit_kparams(W, kt, importance)
    step, offset = params.per_column(kt)
    codes = round_k(W.float(), step, offset, kt).to(torch.uint8)
    return KQWeight(codes, params, kt.name)
