"""Dense bit packing of unsigned integer codes (2..8 bits) into bytes.

Every 8 codes of ``bits`` bits become ``bits`` bytes, little-endian: code k of a run of 8 sits at bit offset
``k * bits`` of a 64-bit word whose bytes are stored low byte first. For 4 bits this is the familiar two nibbles
per byte, low nibble first; for 3 bits, 8 codes fill 3 bytes with no waste.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import LowbitError


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (rounded up to whole runs of 8 codes; 8-bit codes are bytes)."""
    return n if bits == 8 else (n + 7) // 8 * bits


# codes converted to 64-bit words at a time: the words take 8 bytes per code, so packing a whole 150k-token
# vocabulary at once held gigabytes of temporaries; each row packs on its own, so slices of rows give the same bytes
_SLICE_CODES = 1 << 23


def _by_row_slices(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, width: int) -> torch.Tensor:
    """``fn`` applied to the rows of x [..., width] a slice at a time (rows are independent), joined."""
    rows = x.reshape(-1, width)
    step = max(1, _SLICE_CODES // max(width, 1))
    if rows.shape[0] <= step:
        out = fn(rows)
    else:
        out = torch.cat([fn(rows[i : i + step]) for i in range(0, rows.shape[0], step)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., n] with values < 2**bits -> uint8 [..., packed_length(n, bits)]."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"can only pack 1..8-bit codes, got bits={bits}")
    if codes.dtype != torch.uint8:
        raise LowbitError(f"pack_bits expects uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    return _by_row_slices(lambda rows: _pack_rows(rows, bits), codes, codes.shape[-1])


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [rows, n] -> uint8 [rows, packed_length(n, bits)]."""
    pad = (-codes.shape[-1]) % 8
    x = torch.nn.functional.pad(codes, (0, pad)).to(torch.int64)
    x = x.view(codes.shape[0], -1, 8)  # [rows, runs, 8]
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (x << shifts).sum(dim=-1)  # [rows, runs] each < 2**(8*bits)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # [rows, runs, bits]
    return out.to(torch.uint8).reshape(codes.shape[0], -1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., packed_length(n, bits)] -> uint8 [..., n]."""
    if packed.shape[-1] != packed_length(n, bits):
        raise LowbitError(
            f"packed tensor has {packed.shape[-1]} bytes per row, expected {packed_length(n, bits)} "
            f"for {n} codes of {bits} bits; the checkpoint is corrupt or its config does not match"
        )
    if bits == 8:
        return packed
    return _by_row_slices(lambda rows: _unpack_rows(rows, bits, n), packed, packed.shape[-1])


def _unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [rows, packed_length(n, bits)] -> uint8 [rows, n]."""
    x = packed.to(torch.int64).view(packed.shape[0], -1, bits)  # [rows, runs, bits]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (x << byte_shifts).sum(dim=-1)  # [rows, runs]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, runs, 8]
    return codes.to(torch.uint8).reshape(packed.shape[0], -1)[:, :n]
