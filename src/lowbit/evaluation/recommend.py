"""The recommendation section of a comparison: sentences derived from the measured rows (and the outlier diagnosis
when one was run). No advice is written in advance; every number and every name comes from this run."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lowbit.evaluation.tasks import headline_metric
from lowbit.evaluation.units import mib
from lowbit.recipe import Recipe

BUDGETS = (0.01, 0.05, 0.25)  # perplexity increase relative to fp for "smallest model within ..."
MIXED = "mixed"  # the grid label of a row whose Linears each have a grid planned to a budget


def _recipe(row: dict[str, Any]) -> Recipe | None:
    return None if row.get("config") is None else Recipe.from_dict(row["config"], stored=True)


def family(row: dict[str, Any]) -> str:
    """'fp', 'activations' (W8A8, LLM.int8()), 'sparse' (pruning) or 'weight-only', from the row's recipe."""
    recipe = _recipe(row)
    if recipe is None:
        return "fp"
    if recipe.quantizes_inputs:
        return "activations"
    if recipe.prunes:
        return "sparse"
    return "weight-only"


def weight_grid(row: dict[str, Any]) -> tuple[float, str] | None:
    """(bits, grid label) of a weight-only row's rounding grid, e.g. (4, 'g128'); a budget's row, whose Linears
    each have their own grid, is (its bits per weight, 'mixed')."""
    recipe = _recipe(row)
    if recipe is None or family(row) != "weight-only" or recipe.weight_step is None:
        return None
    if recipe.budget is not None:
        return recipe.budget, MIXED
    grid = recipe.weight_step.grid
    assert grid is not None
    if grid.ggml:  # a llama.cpp K type or mix is its own grid, not the integer grid of its sub-blocks
        return grid.bits, grid.ggml
    if grid.float_type:  # NVFP4 is not INT4 g16
        return grid.bits, grid.label
    return grid.bits, {"tensor": "per-tensor", "channel": "per-channel"}.get(grid.granularity, f"g{grid.group_size}")


def is_rtn(row: dict[str, Any]) -> bool:
    """The round-to-nearest baseline the other rows are measured against: one data-free weight rounding step whose
    grid takes each group's range as it is (a searched range, "mse", is itself a method the baseline measures;
    llama.cpp's own fit is its baseline)."""
    recipe = _recipe(row)
    return recipe is not None and len(recipe.steps) == 1 and recipe.steps[0].rounds \
        and not recipe.needs_calibration and not recipe.quantizes_inputs \
        and (recipe.steps[0].grid is None or not recipe.steps[0].grid.searched)


def delta(row: dict[str, Any], base: dict[str, Any]) -> float:
    return row["perplexity"] / base["perplexity"] - 1


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both size and perplexity, smallest first."""
    front: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["disk_bytes"], r["perplexity"])):
        if not front or r["perplexity"] < front[-1]["perplexity"]:
            front.append(r)
    return front


def ranking(rows: list[dict[str, Any]]) -> list[str]:
    """Quantized recipes from best to worst perplexity."""
    return [r["recipe"] for r in sorted(rows[1:], key=lambda r: r["perplexity"])]


def recommendations(results: dict[str, Any], diagnosis: dict[str, Any] | None = None) -> list[str]:
    rows = results["rows"]
    base, quantized = rows[0], rows[1:]
    lines: list[str] = []
    if diagnosis:
        lines.extend(diagnosis["findings"][:2])
    if not quantized:
        return lines
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in quantized:
        by_family[family(r)].append(r)

    acts = sorted(by_family["activations"], key=lambda r: r["perplexity"])
    if acts:
        best, worst = acts[0], acts[-1]
        sentence = f"Activation quantization: {best['recipe']} is closest to {base['recipe']} ({_pct(delta(best, base))})"
        if worst is not best:
            sentence += f"; {worst['recipe']} is worst ({_pct(delta(worst, base))}, {worst['description']})"
        lines.append(sentence + ".")

    by_grid: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in by_family["weight-only"]:
        by_grid[weight_grid(r)].append(r)  # type: ignore[index]
    for (bits, grid), group in sorted(by_grid.items()):
        best = min(group, key=lambda r: r["perplexity"])
        sentence = f"For W{bits:g} {grid}, use {best['recipe']}: perplexity {best['perplexity']:.3f} ({_pct(delta(best, base))}), {mib(best['disk_bytes'])}"
        rtn = next((r for r in group if is_rtn(r)), None)
        if rtn is not None and rtn is not best:
            sentence += f"; round-to-nearest ({rtn['recipe']}) gives {_pct(delta(rtn, base))}"
        beaten = [r["recipe"] for r in group if rtn is not None and r is not rtn and r["perplexity"] > rtn["perplexity"]]
        if beaten:
            sentence += f"; {', '.join(beaten)} did not beat it on this model"
        lines.append(sentence + ".")

    sparse = sorted(by_family["sparse"], key=lambda r: r["perplexity"])
    if sparse:
        lines.append(
            f"Pruning: {sparse[0]['recipe']} keeps the most quality ({_pct(delta(sparse[0], base))})"
            + (f", {sparse[-1]['recipe']} the least ({_pct(delta(sparse[-1], base))})" if len(sparse) > 1 else "")
            + f"; on disk it is {base['disk_bytes'] / sparse[0]['disk_bytes']:.2f}x smaller than {base['recipe']}."
        )

    for budget in BUDGETS:
        fits = [r for r in quantized if delta(r, base) <= budget]
        if fits:
            small = min(fits, key=lambda r: (r["disk_bytes"], r["perplexity"]))  # of equal sizes, the better one
            lines.append(
                f"Smallest within {100 * budget:g}% of {base['recipe']} perplexity: {small['recipe']} "
                f"({mib(small['disk_bytes'])}, {base['disk_bytes'] / small['disk_bytes']:.2f}x smaller, {_pct(delta(small, base))})."
            )
        else:
            lines.append(f"No recipe stays within {100 * budget:g}% of {base['recipe']} perplexity.")
    front = [r["recipe"] for r in pareto_front(rows)]
    lines.append(f"Size/perplexity Pareto front, smallest first: {', '.join(front)}.")
    return lines + task_sentences(base, quantized)


def task_sentences(base: dict[str, Any], quantized: list[dict[str, Any]]) -> list[str]:
    """Per lm-eval task (compare --tasks): which recipe keeps the most and which loses the most of the unquantized
    row's accuracy, in points, and whether the best by perplexity is also the best by accuracy (it often is not)."""
    lines = []
    by_perplexity = min(quantized, key=lambda r: r["perplexity"]) if quantized else None
    for task, metrics in (base.get("tasks") or {}).items():
        name = headline_metric(metrics)
        scored = [(r, r["tasks"][task][name]) for r in quantized if task in (r.get("tasks") or {})]
        if not scored:
            continue
        scored.sort(key=lambda pair: -pair[1])
        (best, top), (worst, bottom) = scored[0], scored[-1]
        sentence = (f"On {task} ({name}, {base['recipe']} {100 * metrics[name]:.1f}): {best['recipe']} keeps the most "
                    f"({100 * (top - metrics[name]):+.1f} points)")
        if worst is not best:
            sentence += f", {worst['recipe']} loses the most ({100 * (bottom - metrics[name]):+.1f} points)"
        if by_perplexity is not best and task in (by_perplexity.get("tasks") or {}) \
                and by_perplexity["tasks"][task][name] < top:
            sentence += f"; the best by perplexity, {by_perplexity['recipe']}, is not the best here"
        lines.append(sentence + ".")
    return lines
