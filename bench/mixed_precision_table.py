"""Print docs/mixed_precision.md's tables from `bench/mixed_precision.sh`'s results: each row's stored bits per weight
of the blocks' Linears (scales and zero points included), its perplexity, and the quantize time in seconds (the
`lowbit quantize` child's wall time, the budget's sensitivity pass and plan included), by method, smallest first.
Rows of the min-max W3/W4 g128 grids that bench/range_search.sh measured with the same model and protocol
(bench/results/range_search*) fill in where this folder has none, marked with their folder.

    .venv/bin/python bench/mixed_precision_table.py [RESULTS_FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM = ("w3g128", "w4g128", "gptq-w3g128", "gptq-w4g128")  # the min-max rows bench/range_search.sh measures


def rows(folder: str) -> tuple[dict, dict[str, dict]]:
    float_row, *measured = json.loads((RESULTS / folder / "results.json").read_text())["rows"]
    return float_row, {r["recipe"]: {**r, "from": folder} for r in measured}


def grid(row: dict) -> tuple | None:
    """A uniform row's weight grid (bits, symmetric, granularity, group size); None for a budget's row."""
    config = row["config"]
    if config.get("budget") is not None:
        return None
    weights = [s["weights"] for s in config["steps"] if s.get("weights")]
    return tuple(weights[-1][k] for k in ("bits", "symmetric", "granularity", "group_size")) if weights else None


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "mixed_precision"
    float_row, measured = rows(folder)
    other = folder.replace("mixed_precision", "range_search")  # the same model and protocol
    if (RESULTS / other / "results.json").exists():
        borrowed = rows(other)[1]
        measured = {**{n: borrowed[n] for n in UNIFORM if n in borrowed}, **measured}
    # a borrowed row stores what a row on the same uniform grid here stores (GPTQ and RTN pack alike)
    sizes = {grid(r): r["linear_bits_per_weight"] for r in measured.values() if r.get("linear_bits_per_weight")}
    for r in measured.values():
        if r.get("linear_bits_per_weight") is None and grid(r) in sizes:
            r["linear_bits_per_weight"] = sizes[grid(r)]
    print(f"float: perplexity {float_row['perplexity']:.3f}")
    print("| recipe | Linear bits/weight | perplexity | quantize (s) |")
    print("|---|---:|---:|---:|")
    for r in sorted(measured.values(), key=lambda r: (r["recipe"].startswith("gptq"), r.get("linear_bits_per_weight") or 0)):
        bits = r.get("linear_bits_per_weight")
        source = "" if r["from"] == folder else f" ({r['from']})"
        print(f"| {r['recipe']}{source} | {'' if bits is None else f'{bits:.3f}'} | {r['perplexity']:.3f} | "
              f"{r['quantize_seconds']:.0f} |")


if __name__ == "__main__":
    main()
