"""Print docs/range_search.md's tables: each method and grid with its min-max fit beside its searched fits, from
`bench/range_search.sh`'s results (bench/results/range_search, its min-max rows there taking precedence over
bench/results/methods'; or the folder named, e.g. range_search-qwen2.5-coder-0.5b). Perplexity, then the
quantize time in seconds (the `lowbit quantize` child's wall time, calibration included).

    .venv/bin/python bench/range_search_table.py [RESULTS_FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FITS = {"": "min-max range", "-mse": "mse", "-imse": "imatrix-mse"}


def rows(folders: tuple[str, ...]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for folder in folders:
        path = RESULTS / folder / "results.json"
        if path.exists():
            found.update({r["recipe"]: r for r in json.loads(path.read_text())["rows"][1:]})
    return found


def cell(row: dict | None) -> str:
    return "not measured" if row is None else f"{row['perplexity']:.3f} ({row['quantize_seconds']:.0f} s)"


def main() -> None:
    folders = tuple(sys.argv[1:]) or ("methods", "methods-actorder", "range_search")
    measured = rows(folders)
    searched = {name.removesuffix(s) for name in measured for s in ("-mse", "-imse") if name.endswith(s)}
    print("| recipe | " + " | ".join(FITS.values()) + " |")
    print("|---|" + "---:|" * len(FITS))
    for base in sorted(searched, key=lambda n: (n.split("w")[-1], n)):
        print(f"| {base} | " + " | ".join(cell(measured.get(base + suffix)) for suffix in FITS) + " |")


if __name__ == "__main__":
    main()
