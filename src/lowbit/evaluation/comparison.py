"""A method comparison as data: rows of (recipe, perplexity, size, time, memory) on the same calibration and
evaluation text, rendered as a Markdown table and a perplexity-vs-size plot.

The first row is always the unquantized model; every delta is relative to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary sibling so an interrupted run never leaves a truncated results file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MiB"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:,.0f} s"


def row_cells(row: dict[str, Any], base: dict[str, Any]) -> dict[str, str]:
    """One comparison row formatted for display, deltas relative to ``base`` (the unquantized row)."""
    return {
        "perplexity": f"{row['perplexity']:.3f}",
        "vs fp": f"{(row['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%",
        "size on disk": _mib(row["disk_bytes"]),
        "smaller by": f"{base['disk_bytes'] / row['disk_bytes']:.2f}x",
        "quantize time": _seconds(row.get("quantize_seconds")),
        "quantize peak RSS": _mib(row.get("peak_rss_bytes")),
        "eval tokens/s": f"{row['eval_tokens_per_second']:,.0f}",
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The comparison as Markdown: a header saying how it was measured, then one row per recipe."""
    rows = results["rows"]
    base = rows[0]
    settings = results["settings"]
    cal, ev = settings["calibration"], settings["evaluation"]
    lines = [
        f"Model `{results['model']}`, unquantized tensors in {settings['dtype']}, run on {settings['machine']}.",
        f"Calibration: {cal['n_sequences']} x {cal['seq_len']} tokens of `{cal['text']}` (calibration part, seed "
        f"{cal['seed']}). Evaluation: perplexity on the held-out part of `{ev['text']}`, GPTQ protocol (documents "
        f"joined with blank lines, {base['windows']} non-overlapping windows of {base['window']} tokens, "
        f"{base['tokens']:,} predicted tokens).",
        "",
        "| recipe | what it does | perplexity | vs fp | size on disk | smaller by | quantize time | quantize peak RSS | eval tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([r["recipe"], r["description"], *row_cells(r, base).values()]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Perplexity against size on disk, one labelled point per recipe; the unquantized model is the reference line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.axhline(rows[0]["perplexity"], color="grey", linestyle="--", linewidth=1, label=f"{rows[0]['recipe']} perplexity")
    for r in rows:
        size = r["disk_bytes"] / 2**20
        ax.scatter(size, r["perplexity"], s=36)
        ax.annotate(r["recipe"], (size, r["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: quality against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RESULTS_JSON, results)
    (folder / RESULTS_MD).write_text(markdown_table(results))
    plot(results, folder / RESULTS_PNG)


def reusable_rows(folder: Path, settings: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """Rows of an earlier comparison in ``folder`` made with the same model and settings, by recipe name."""
    try:
        earlier = json.loads((folder / RESULTS_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if earlier.get("settings") != settings or earlier.get("model") != model:
        return {}
    return {r["recipe"]: r for r in earlier.get("rows", [])}
