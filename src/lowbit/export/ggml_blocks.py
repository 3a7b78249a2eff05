"""lowbit's integer weights as GGML blocks (what llama.cpp and ollama run), without re-rounding anything.

GGML's legacy formats use blocks of 32 consecutive input weights of one row:
  * Q8_0: float16 d, 32 int8 q;                          value = d * q
  * Q5_0: float16 d, 4 bytes qh, 16 bytes of nibbles;    value = d * (q - 16)
  * Q5_1: float16 d, float16 m, qh, 16 bytes;            value = d * q + m
  * Q4_0: float16 d, 16 bytes of nibbles;                value = d * (q - 8)
  * Q4_1: float16 d, float16 m, 16 bytes;                value = d * q + m
Nibble byte j of a block holds q[j] in its low half and q[j + 16] in its high half; bit j of the little-endian
uint32 qh is bit 4 of q[j]. lowbit's symmetric grids use zero point 2**(bits-1), so W8, W5 and W4 symmetric g32
codes are Q8_0, Q5_0 and Q4_0 exactly; an asymmetric W5 / W4 g32 grid is Q5_1 / Q4_1 with m = -zero * scale,
exact up to float16 rounding of m. K-quant weights (numerics/kquant.py) are Q2_K .. Q6_K (export/ggml_kblocks.py).
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics.kquant import KQWeight
from lowbit.numerics.qweight import QWeight

GGML_BLOCK = 32


GGML_HOLDS = ("GGUF holds K-quant grids (Q2_K .. Q6_K) and 32-column blocks: W8 symmetric g32 (Q8_0), W5 or W4 "
              "g32 (Q5_0 / Q4_0 symmetric, Q5_1 / Q4_1 asymmetric)")


def ggml_kind(bits: int, symmetric: bool, group_size: int | None) -> str | None:
    """The GGML block type holding a grid of ``bits`` with groups of ``group_size`` columns exactly (None: per-channel
    or per-tensor), or None when none does: the one statement of the rule, for recipes and for weights."""
    if group_size != GGML_BLOCK:
        return None
    if bits == 8 and symmetric:
        return "Q8_0"
    if bits in (4, 5):
        return f"Q{bits}_0" if symmetric else f"Q{bits}_1"
    return None


def ggml_type_for(qweight: QWeight | KQWeight) -> str:
    """The GGML type holding a weight's grid exactly ('Q4_K', 'Q8_0', ...); raises for one GGML cannot hold."""
    if isinstance(qweight, KQWeight):
        return qweight.kind
    contiguous = qweight.groups_in_order
    kind = ggml_kind(qweight.bits, qweight.symmetric, qweight.group_size)
    if kind is not None and qweight.in_features % GGML_BLOCK == 0 and contiguous and qweight.scale.shape[0] > 1:
        return kind
    raise LowbitError(
        f"{GGML_HOLDS}; this weight is W{qweight.bits} {'symmetric' if qweight.symmetric else 'asymmetric'} "
        f"group size {qweight.group_size}{' with act-order groups' if not contiguous else ''}; re-quantize with "
        "group_size 32 (e.g. `lowbit recipes gptq-w4g128 > r.json`, set \"group_size\": 32)"
    )


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [rows, blocks, 32] in 0..15 -> [rows, blocks, 16] bytes."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [...] -> [..., 2] little-endian float16 bytes (the d / m / dmin fields of GGML blocks)."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of q [rows, blocks, 32] as the little-endian uint32 qh: [rows, blocks, 4] bytes."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(GGML_BLOCK, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(axis=-1, dtype=np.uint32).astype("<u4")).view(np.uint8).reshape(*q.shape[:2], 4)


def ggml_blocks(qweight: QWeight | KQWeight) -> tuple[str, np.ndarray]:
    """(type name, uint8 [out, n_blocks * block_bytes]) for a weight of a grid ``ggml_type_for`` accepts."""
    kind = ggml_type_for(qweight)
    if isinstance(qweight, KQWeight):
        from lowbit.export.ggml_kblocks import k_blocks  # which reads this module's float16 helper

        return kind, k_blocks(qweight)
    out, n = qweight.codes.shape
    codes = qweight.codes.cpu().numpy().reshape(out, n // GGML_BLOCK, GGML_BLOCK)  # [out, blocks, 32]
    scale = qweight.scale.cpu().numpy().astype(np.float16)  # [out, blocks]
    if kind == "Q8_0":
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [f16_bytes(scale), q]
    elif kind in ("Q4_0", "Q5_0"):
        high = [_high_bits(codes)] if kind == "Q5_0" else []
        parts = [f16_bytes(scale), *high, _nibbles(codes & 15)]
    else:
        assert qweight.zero is not None
        m = -qweight.zero.cpu().numpy().astype(np.float32) * scale.astype(np.float32)
        high = [_high_bits(codes)] if kind == "Q5_1" else []
        parts = [f16_bytes(scale), f16_bytes(m), *high, _nibbles(codes & 15)]
    return kind, np.concatenate(parts, axis=-1).reshape(out, -1)
