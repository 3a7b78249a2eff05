"""lowbit's integer weights as GGML blocks (what llama.cpp and ollama run), without re-rounding anything.

GGML's legacy formats use blocks of 32 consecutive input weights of one row:
  * Q8_0: float16 d, 32 int8 q;                value = d * q
  * Q4_0: float16 d, 16 bytes of nibbles;      value = d * (q - 8)
  * Q4_1: float16 d, float16 m, 16 bytes;      value = d * q + m
Nibble byte j of a block holds q[j] in its low half and q[j + 16] in its high half. lowbit's symmetric grids use
zero point 2**(bits-1), so W8 and W4 symmetric g32 codes are Q8_0 and Q4_0 exactly; an asymmetric W4 g32 grid is
Q4_1 with m = -zero * scale, exact up to float16 rounding of m.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.numerics.qweight import QWeight

GGML_BLOCK = 32


GGML_HOLDS = "GGUF holds 32-column blocks: W8 symmetric g32 (Q8_0), W4 symmetric g32 (Q4_0) or W4 asymmetric g32 (Q4_1)"


def ggml_kind(bits: int, symmetric: bool, group_size: int | None) -> str | None:
    """The GGML block type holding a grid of ``bits`` with groups of ``group_size`` columns exactly (None: per-channel
    or per-tensor), or None when none does: the one statement of the rule, for recipes and for weights."""
    if group_size != GGML_BLOCK:
        return None
    if bits == 8 and symmetric:
        return "Q8_0"
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    return None


def ggml_type_for(qweight: QWeight) -> str:
    """'Q8_0', 'Q4_0' or 'Q4_1' for a grid GGML can hold exactly; raises otherwise."""
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


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [rows, blocks] -> [rows, blocks, 2] little-endian float16 bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def ggml_blocks(qweight: QWeight) -> tuple[str, np.ndarray]:
    """(type name, uint8 [out, n_blocks * block_bytes]) for a QWeight of a grid ``ggml_type_for`` accepts."""
    kind = ggml_type_for(qweight)
    out, n = qweight.codes.shape
    codes = qweight.codes.cpu().numpy().reshape(out, n // GGML_BLOCK, GGML_BLOCK)  # [out, blocks, 32]
    scale = qweight.scale.cpu().numpy().astype(np.float16)  # [out, blocks]
    if kind == "Q8_0":
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [_f16_bytes(scale), q]
    elif kind == "Q4_0":
        parts = [_f16_bytes(scale), _nibbles(codes)]
    else:
        assert qweight.zero is not None
        m = -qweight.zero.cpu().numpy().astype(np.float32) * scale.astype(np.float32)
        parts = [_f16_bytes(scale), _f16_bytes(m), _nibbles(codes)]
    return kind, np.concatenate(parts, axis=-1).reshape(out, -1)
