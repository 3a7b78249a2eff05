"""K-quant weights (numerics/kquant.py) as GGML's Q2_K .. Q6_K blocks, bit for bit: every super-block of 256 columns
of a row becomes one block; nothing is rounded here (the codes, sc, m, d and dmin are the ones lowbit fitted).

Byte layouts (ggml's block_q*_K structs, little-endian), for codes q[0..255] of one super-block:
  Q2_K  84 B: scales[16] (sc | m << 4), qs[64], d, dmin.   q[128h + 32s + l] = qs[32h + l] >> 2s & 3
  Q3_K 110 B: hmask[32], qs[64], scales[12], d.             low 2 bits as Q2_K; bit 2 of q[32b + l] = hmask[l] >> b & 1;
              6-bit sc + 32: low nibble of sc[i] in scales[i % 8] >> 4 (i // 8), high 2 bits in scales[8 + i % 4] >> 2 (i // 4)
  Q4_K 144 B: d, dmin, scales[12], qs[128].                 q[64c + 32k + l] = qs[32c + l] >> 4k & 15
  Q5_K 176 B: d, dmin, scales[12], qh[32], qs[128].         low 4 bits as Q4_K; bit 4 of q[32b + l] = qh[l] >> b & 1
              Q4_K/Q5_K scales: for j < 4, scales[j] = sc[j] | (sc[j+4] >> 4) << 6, scales[j+4] = m[j] | (m[j+4] >> 4) << 6,
              scales[j+8] = sc[j+4] & 15 | (m[j+4] & 15) << 4
  Q6_K 210 B: ql[128], qh[64], scales[16] (int8), d.        q[128h + 64k + l] low 4 bits = ql[64h + l] >> 4k & 15 (l < 64);
              q[128h + 32s + l] high 2 bits = qh[32h + l] >> 2s & 3 (l < 32)
The gguf package's dequantization of these bytes equals lowbit's own (tests/test_kquant.py).
"""

from __future__ import annotations

import numpy as np

from lowbit.export.ggml_blocks import f16_bytes
from lowbit.numerics.kquant import SUPER_BLOCK, KQWeight


def _bit_planes(q: np.ndarray, parts: int, width: int, shift: int) -> np.ndarray:
    """Pack codes q [blocks, parts * planes * width] where part p, plane s, lane l sits at byte p * width + l, bits
    shift * s: [blocks, parts * width] bytes."""
    blocks = q.shape[0]
    planes = q.shape[1] // (parts * width)
    q = q.reshape(blocks, parts, planes, width).astype(np.uint16)
    shifts = (np.arange(planes, dtype=np.uint16) * shift).reshape(1, 1, planes, 1)
    return np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint8).reshape(blocks, parts * width)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: eight 6-bit sc and m [blocks, 8] -> [blocks, 12] bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _scales_q3(sc: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen signed sc [blocks, 16] -> [blocks, 12] bytes of (sc + 32) in 6 bits."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    low = u & 15  # nibble of i in byte i % 8, half i // 8
    high = u >> 4  # 2 bits of i in byte 8 + i % 4, pair i // 4
    first = low.reshape(-1, 2, 8)
    low_bytes = first[:, 0] | (first[:, 1] << 4)
    pairs = high.reshape(-1, 4, 4)
    high_bytes = pairs[:, 0] | (pairs[:, 1] << 2) | (pairs[:, 2] << 4) | (pairs[:, 3] << 6)
    return np.concatenate([low_bytes, high_bytes], axis=1).astype(np.uint8)


def k_blocks(qweight: KQWeight) -> np.ndarray:
    """uint8 [out, in / 256 * block bytes]: the GGML blocks of a K-quant weight, rows in order."""
    kind = qweight.kind
    out, n = qweight.codes.shape
    blocks = out * (n // SUPER_BLOCK)
    q = qweight.codes.cpu().numpy().reshape(blocks, SUPER_BLOCK)
    p = qweight.params
    d = f16_bytes(p.d.cpu().numpy().reshape(blocks))
    sc = p.sc.cpu().numpy().reshape(blocks, -1)
    if kind in ("Q2_K", "Q4_K", "Q5_K"):
        assert p.dmin is not None and p.m is not None
        dmin = f16_bytes(p.dmin.cpu().numpy().reshape(blocks))
        m = p.m.cpu().numpy().reshape(blocks, -1)
    if kind == "Q2_K":
        scales = (sc.astype(np.uint8) & 15) | (m.astype(np.uint8) << 4)
        parts = [scales, _bit_planes(q, 2, 32, 2), d, dmin]
    elif kind == "Q3_K":
        hmask = _bit_planes(q >> 2, 1, 32, 1)
        parts = [hmask, _bit_planes(q & 3, 2, 32, 2), _scales_q3(sc), d]
    elif kind == "Q4_K":
        parts = [d, dmin, _scales_k4(sc, m), _bit_planes(q, 4, 32, 4)]
    elif kind == "Q5_K":
        parts = [d, dmin, _scales_k4(sc, m), _bit_planes(q >> 4, 1, 32, 1), _bit_planes(q & 15, 4, 32, 4)]
    else:  # Q6_K
        ql = _bit_planes(q & 15, 2, 64, 4)
        qh = _bit_planes(q >> 4, 2, 32, 2)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    return np.concatenate(parts, axis=1).reshape(out, -1)
