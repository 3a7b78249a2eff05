"""A method comparison as data: rows of (recipe, perplexity, size, time, memory) on the same calibration and
evaluation text, rendered as report.md / report.html with a recommendation section and plots.

The first row is always the unquantized model; every delta is relative to it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, TypedDict

from lowbit.evaluation.compare_plots import write_plots
from lowbit.evaluation.recommend import recommendations
from lowbit.evaluation.speed import machine_line
from lowbit.evaluation.tasks import headline_metric
from lowbit.evaluation.units import mib
from lowbit.io.atomic import write_json_atomic, write_text_atomic
from lowbit.schema import check_record, read_json

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:,.0f} s"


def md_escape(text: str) -> str:
    """A table cell: a literal | (as in "|x| > 6") would end the cell."""
    return text.replace("|", "\\|")


def task_cells(row: dict[str, Any], base: dict[str, Any]) -> dict[str, str]:
    """One column per lm-eval task of the comparison (the unquantized row's): its headline metric in percent."""
    cells = {}
    for task, metrics in (base.get("tasks") or {}).items():
        name = headline_metric(metrics)
        value = (row.get("tasks") or {}).get(task, {}).get(name)
        cells[f"{task} {name}"] = "" if value is None else f"{value * 100:.1f}"
    return cells


def task_line(tasks: dict[str, Any], base: dict[str, Any]) -> str:
    """How the task columns were measured (settings["tasks"] of a comparison run with --tasks)."""
    examples = ", ".join(f"{task} {n}" for task, n in (base.get("task_examples") or {}).items())
    shots = "each task's own few-shot setting" if tasks["num_fewshot"] is None else f"{tasks['num_fewshot']}-shot"
    limit = "" if tasks["limit"] is None else f", at most {tasks['limit']} per task"
    return (f"Task accuracy: lm-evaluation-harness, {shots}, in percent (examples: {examples or 'as the task has'}"
            f"{limit}).")


def comparison_cells(row: dict[str, Any], base: dict[str, Any]) -> dict[str, str]:
    """One comparison row formatted for display, deltas relative to ``base`` (the unquantized row)."""
    return {
        "perplexity": f"{row['perplexity']:.3f}",
        "vs fp": f"{(row['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%",
        "size on disk": mib(row["disk_bytes"]),
        "smaller by": f"{base['disk_bytes'] / row['disk_bytes']:.2f}x",
        # the blocks' Linears alone, scales included: what a budget (``-b3.5``) counts
        "Linear bits/weight": "" if row.get("linear_bits_per_weight") is None else f"{row['linear_bits_per_weight']:.3f}",
        "quantize time": _seconds(row.get("quantize_seconds")),
        "quantize peak RSS": mib(row.get("peak_rss_bytes")),
        "eval tokens/s": f"{row['eval_tokens_per_second']:,.0f}",
        **task_cells(row, base),
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The comparison as Markdown: a header saying how it was measured, then one row per recipe."""
    rows = results["rows"]
    base = rows[0]
    settings = results["settings"]
    cal, ev = settings["calibration"], settings["evaluation"]
    lines = [
        f"Model `{results['model']}`, unquantized tensors in {settings['dtype']}, "
        f"run on {machine_line(settings['machine'])}.",
        f"Calibration: {cal['n_sequences']} x {cal['seq_len']} tokens of `{cal['text']}` (calibration part, seed "
        f"{cal['seed']}). Evaluation: perplexity on the held-out part of `{ev['text']}`, GPTQ protocol (documents "
        f"joined with blank lines, {base['windows']} non-overlapping windows of {base['window']} tokens, "
        f"{base['tokens']:,} predicted tokens).",
        *([task_line(settings["tasks"], base)] if settings.get("tasks") else []),
        "",
        "| recipe | what it does | " + " | ".join(comparison_cells(base, base)) + " |",
        "|---|---|" + "---:|" * len(comparison_cells(base, base)),
    ]
    for r in rows:
        lines.append("| " + " | ".join([r["recipe"], md_escape(r["description"]), *comparison_cells(r, base).values()]) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(results: dict[str, Any], recommendations: list[str], plots: list[str]) -> str:
    """report.md: how it was measured, the table, the recommendations, the plots."""
    lines = [f"# {results['model']}: quantization comparison", "", markdown_table(results), "## Recommendation", ""]
    lines += [f"- {line}" for line in recommendations] + ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def report_html(results: dict[str, Any], recommendations: list[str], plots: list[str]) -> str:
    """report.html: the same content as report.md, readable in a browser without a Markdown renderer."""
    rows = results["rows"]
    base = rows[0]
    header = ["recipe", "what it does", *comparison_cells(base, base)]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [r["recipe"], r["description"], *comparison_cells(r, base).values()]) + "</tr>"
        for r in rows
    )
    intro = markdown_table(results).split("\n\n")[0]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(results['model'])}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "td:nth-child(n+3){text-align:right}</style></head><body>"
        f"<h1>{html.escape(results['model'])}: quantization comparison</h1><p>{html.escape(intro)}</p>"
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr>{body}</table>"
        "<h2>Recommendation</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in recommendations) + "</ul>"
        "<h2>Plots</h2>" + "".join(f"<p><img src='{name}' alt='{name}'></p>" for name in plots) + "</body></html>\n"
    )


def write_results(results: dict[str, Any], folder: Path, diagnosis: dict[str, Any] | None = None) -> None:
    """results.json (raw rows), report.md and report.html (table, recommendation, plots) and the PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RESULTS_JSON, results)
    plots = write_plots(results, folder)
    advice = recommendations(results, diagnosis)
    write_text_atomic(folder / REPORT_MD, report_markdown(results, advice, plots))
    write_text_atomic(folder / REPORT_HTML, report_html(results, advice, plots))


class _MeasuredRow(TypedDict):
    """The keys of a results.json row that the table, the plots and the recommendation read."""

    recipe: str
    description: str
    config: dict[str, Any] | None
    perplexity: float
    disk_bytes: int
    eval_tokens_per_second: float
    tokens: int
    window: int
    windows: int


class _Row(_MeasuredRow, total=False):
    quantize_seconds: float
    peak_rss_bytes: int
    mean_linear_error: float | None
    block_errors: list[float]
    transforms_from: str | None
    linear_bits_per_weight: float | None


class _Results(TypedDict):
    model: str
    settings: dict[str, Any]
    rows: list[_Row]


def reusable_rows(folder: Path, settings: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """Rows of an earlier comparison in ``folder`` made with the same model and settings, by recipe name. A
    results.json that is not one (corrupt, or rows missing what the report reads) is refused, not reused."""
    path = folder / RESULTS_JSON
    if not path.exists():
        return {}
    fix = "delete it or run without --resume"
    earlier = read_json(path, "comparison results", fix)
    check_record(earlier, _Results, str(path), fix)
    if earlier["settings"] != settings or earlier["model"] != model:
        return {}
    return {r["recipe"]: r for r in earlier["rows"]}
