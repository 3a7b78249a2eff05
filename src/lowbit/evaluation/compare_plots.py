"""A comparison as pictures: perplexity against bits per method, perplexity against bytes with the Pareto front,
and the per-block Linear error of every recipe."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lowbit.evaluation.plotting import pyplot, save_figure
from lowbit.evaluation.recommend import MIXED, pareto_front, weight_grid
from lowbit.evaluation.units import MIB
from lowbit.numerics.range_search import SEARCHES

PPL_VS_BITS_PNG = "ppl_vs_bits.png"
PARETO_PNG = "pareto.png"
LAYER_ERROR_PNG = "layer_error.png"



def _method(row: dict[str, Any]) -> str:
    """The recipe's step types, e.g. 'awq+gptq', 'rotate+gptq' ('quarot+gptq': online rotations too)."""
    return "+".join("quarot" if s["type"] == "rotate" and s.get("online") else s["type"] for s in row["config"]["steps"])


def quant_curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Curve name (method, grid) -> (bits, perplexity) of each weight-only row after the first (the float one); a
    budget's rows (each Linear on its own grid) are a curve of their own at their budget's bits per weight."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows[1:]:
        grid = weight_grid(r)
        if grid is not None and grid[1] == MIXED:  # each Linear on its own grid: at its budget (scales included,
            series[f"{_method(r)} {MIXED}"].append((grid[0], r["perplexity"]))  # the uniform rows at their nominal bits)
        elif grid is not None:
            steps = r["config"]["steps"]
            extra = "-actorder" if any(s.get("act_order") for s in steps) else ""
            # a symmetric integer grid and a searched range are curves of their own (older rows lack the keys)
            grids = [s["weights"] for s in steps if "weights" in s]
            if any(g.get("symmetric") and not g.get("ggml") and not g.get("float_type") for g in grids):
                extra += " sym"
            extra += "".join(sorted({f" {g['fit']}" for g in grids if g.get("fit") in SEARCHES}))
            series[f"{_method(r)}{extra} {grid[1]}"].append((grid[0], r["perplexity"]))
    return series


def plot_ppl_vs_bits(results: dict[str, Any], path: Path) -> None:
    """One line per (method, grid) over the weight-only rows: the quant curve."""
    plt = pyplot()
    rows = results["rows"]
    series = quant_curves(rows)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(rows[0]["perplexity"], color="grey", linestyle="--", linewidth=1, label=rows[0]["recipe"])
    for name, points in sorted(series.items()):
        bits, ppl = zip(*sorted(points))
        ax.plot(bits, ppl, marker="o", label=name)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: perplexity against bits (weight-only)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_pareto(results: dict[str, Any], path: Path) -> None:
    """Perplexity against size on disk, one labelled point per recipe; the Pareto front joined."""
    plt = pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        size = r["disk_bytes"] / MIB
        ax.scatter(size, r["perplexity"], s=30)
        ax.annotate(r["recipe"], (size, r["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto_front(rows)
    ax.plot([r["disk_bytes"] / MIB for r in front], [r["perplexity"] for r in front], color="black", linewidth=1,
            label="Pareto front")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: quality against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    save_figure(fig, path)


def plot_layer_error(results: dict[str, Any], path: Path) -> None:
    """Mean relative Linear output error per block, one line per recipe that recorded it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for r in results["rows"][1:]:
        errors = r.get("block_errors")
        if errors:
            ax.plot(range(len(errors)), errors, marker=".", linewidth=1, label=r["recipe"])
    ax.set_xlabel("block")
    ax.set_ylabel("mean relative Linear output error")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: per-layer error of each recipe")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def write_plots(results: dict[str, Any], folder: Path) -> list[str]:
    names = [PPL_VS_BITS_PNG, PARETO_PNG, LAYER_ERROR_PNG]
    for plot, name in zip((plot_ppl_vs_bits, plot_pareto, plot_layer_error), names):
        plot(results, folder / name)
    return names
