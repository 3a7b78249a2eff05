"""Byte counts as people read them: one formatter for every table and sentence (CLI, comparison report,
recommendation), so the same figure never appears with two precisions."""

from __future__ import annotations

MIB = 2**20


def mib(n: float | None) -> str:
    """``n`` bytes as "1,234.5 MiB"; "" for a figure that was not measured (the unquantized row has no quantize
    peak RSS)."""
    return "" if n is None else f"{n / MIB:,.1f} MiB"
