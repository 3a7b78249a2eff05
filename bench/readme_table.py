"""Print README's method table from bench/results/methods/results.json.

Eval speed is left out and quantize times are upper bounds: the benchmark shared its two cores with other jobs
for part of its run. A peak RSS recorded before lowbit
measured VmHWM (rows whose child inherited the parent's high-water mark, see cli/common.py) is shown as "n/m";
bench/peak_memory.py measures those recipes alone.

    .venv/bin/python bench/readme_table.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.evaluation.comparison import comparison_cells, md_escape

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

RESULTS = Path(__file__).resolve().parent / "results" / "methods" / "results.json"
INHERITED_PEAK = 1_796_554_752  # bytes: the parent's high-water mark that the first two rows' children inherited


def main() -> None:
    rows = json.loads(RESULTS.read_text())["rows"]
    base = rows[0]
    print("| recipe | what it does | perplexity | vs fp | size on disk | smaller by | quantize time | mean Linear error | quantize peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = r.get("peak_rss_bytes")
        rss = "" if peak is None else ("n/m" if peak == INHERITED_PEAK else f"{peak / 2**20:,.0f} MiB")
        error = "" if r.get("mean_linear_error") is None else f"{r['mean_linear_error']:.4f}"
        cells = comparison_cells(r, base)
        shared = [cells[c] for c in ("perplexity", "vs fp", "size on disk", "smaller by", "quantize time")]
        print("| " + " | ".join([r["recipe"], md_escape(r["description"]), *shared, error, rss]) + " |")


if __name__ == "__main__":
    main()
