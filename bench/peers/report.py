"""The peer benchmark's reports: per model, bench/results/peers/<model>-g<G>/report.md from its results.json
(perplexity per tool, then wall time and peak RSS medians, each with lowbit's ratio to the best peer, lower is
better for all three, and for time and memory to llm-compressor); across models, bench/results/peers/summary.md
(lowbit / best peer per method and model, for perplexity, time and memory)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PEERS = ("llmcompressor", "gptqmodel")
# a perplexity this many times the float model's is a broken output, not a quality level: it is shown as broken and
# left out of the "best peer" (llm-compressor's SmoothQuant on Gemma 3 gave 1.6e11 against float 15.8)
BROKEN = 100
NAMES = {"lowbit": "lowbit", "lowbit-bf16": "lowbit, bf16 forwards", "llmcompressor": "llm-compressor",
         "gptqmodel": "GPTQModel"}


def _broken(results: dict, row: dict) -> bool:
    return row.get("perplexity", 0) > BROKEN * results.get("fp32", {}).get("perplexity", float("inf"))


def _value(results: dict, tool: str, method: str, key: str) -> float | None:
    row = results["rows"].get(tool, {}).get(method)
    if row is None or "error" in row or (key == "perplexity" and _broken(results, row)):
        return None
    return row.get(key)


def _cell(results: dict, tool: str, method: str, key: str, fmt: str) -> str:
    row = results["rows"].get(tool, {}).get(method)
    if row is None:
        return "not run"
    if "error" in row:
        return "failed (see JSON)"
    if key == "perplexity" and _broken(results, row):
        return f"broken ({row[key]:.3g})"
    value = row.get(key)
    return "" if value is None else format(value, fmt)


def _ratio(results: dict, method: str, key: str, peers: tuple[str, ...], tool: str = "lowbit") -> str:
    ours = _value(results, tool, method, key)
    theirs = [v for v in (_value(results, p, method, key) for p in peers) if v is not None]
    if ours is None or not theirs:
        return ""
    return f"{ours / min(theirs):.3f}"


def _methods(results: dict) -> list[str]:
    seen: list[str] = []
    for rows in results["rows"].values():
        seen += [m for m in rows if m not in seen]
    order = results.get("methods", [])
    return sorted(seen, key=lambda m: order.index(m) if m in order else len(order))


def _repeats(results: dict, tool: str, method: str) -> str:
    row = results["rows"].get(tool, {}).get(method, {})
    n = len(row.get("wall_seconds", []))
    return f" (n={n})" if n else ""


def _seeds(results: dict) -> str:
    seeds = sorted({s for rows in results["rows"].values() for row in rows.values() for s in row.get("seeds", [])})
    return ", ".join(map(str, seeds))


def _tools(results: dict) -> tuple[str, ...]:
    """lowbit, lowbit with bfloat16 forwards where it was run, then the peers."""
    return ("lowbit",) + (("lowbit-bf16",) if "lowbit-bf16" in results["rows"] else ()) + PEERS


def _plain_table(results: dict, title: str, methods: list[str], key: str, fmt: Callable[[float], str]) -> list[str]:
    """One value per (method, tool), no ratios."""
    tools = _tools(results)
    lines = ["", f"## {title}", "", "| method | " + " | ".join(NAMES[t] for t in tools) + " |",
             "|---|" + "---:|" * len(tools)]
    for m in methods:
        cells = []
        for t in tools:
            value = _value(results, t, m, key)
            cells.append(fmt(value) if value is not None else _cell(results, t, m, key, ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict, path: Path) -> None:
    methods = _methods(results)
    tools = _tools(results)
    bf16 = "lowbit-bf16" in tools
    n, length = results["calibration"]
    windows, window = results["evaluation"]
    fp = results.get("fp32", {}).get("perplexity")
    shas = ", ".join(f"seed {k}: {v}" for k, v in sorted(results["calibration_sha"].items()))
    lines = [
        f"# lowbit next to llm-compressor and GPTQModel: {results['model']}, groups of {results['group_size']}",
        "",
        f"{results['model']} (float32 input), calibration {n} x {length} token ids per seed ({shas}), perplexity by "
        f"lowbit's evaluator on {windows} windows of {window} tokens (sha {results['evaluation_sha']})"
        f"{f', fp32 {fp:.3f}' if fp else ''}. Machine: {results['machine']}; date {results.get('date', '')}. "
        f"Calibration seeds run: {_seeds(results)}. Perplexity is the median over a row's runs (one per seed), times "
        "and peak RSS the medians over its runs, each a fresh process from start to exit (model load and save "
        "included). Ratios are lowbit / best peer: below 1 is better for lowbit.",
        "",
        "## Perplexity (lower is better)",
        "",
        "| method | " + " | ".join(NAMES[t] for t in tools) + " | lowbit / best peer |",
        "|---|" + "---:|" * (len(tools) + 1),
    ]
    for m in methods:
        cells = [_cell(results, t, m, "perplexity", ".3f") for t in tools]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_ratio(results, m, 'perplexity', PEERS)} |")
    for title, key, scale, fmt in (
        ("Quantization wall time, seconds (median)", "median_wall_seconds", 1.0, ".1f"),
        ("Peak RSS, MiB (median)", "median_peak_rss_bytes", 2**20, ".0f"),
    ):
        lines += [
            "", f"## {title}", "",
            "| method | " + " | ".join(NAMES[t] for t in tools) + " | lowbit / best peer | lowbit / llm-compressor |"
            + (" lowbit bf16 / llm-compressor |" if bf16 else ""),
            "|---|" + "---:|" * (len(tools) + 2 + bf16),
        ]
        for m in methods:
            cells = []
            for t in tools:
                value = _value(results, t, m, key)
                cells.append(format(value / scale, fmt) + _repeats(results, t, m) if value is not None
                             else _cell(results, t, m, key, fmt))
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_ratio(results, m, key, PEERS)} | "
                         f"{_ratio(results, m, key, ('llmcompressor',))} |"
                         + (f" {_ratio(results, m, key, ('llmcompressor',), 'lowbit-bf16')} |" if bf16 else ""))
    lines += _plain_table(results, "Output size, MiB (weight files)", methods, "output_bytes",
                          lambda v: f"{v / 2**20:.1f}")
    pruned = [m for m in methods if m.startswith(("wanda", "sparsegpt"))]
    if pruned:
        lines += _plain_table(results, "Achieved sparsity (share of zero weights in the evaluated blocks' Linears)",
                              pruned, "zero_share", lambda v: f"{v:.3f}")
    errors = [(t, m, row["error"]) for t, rows in results["rows"].items() for m, row in rows.items() if "error" in row]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {NAMES[t]} {m}: {e}" for t, m, e in errors]
    path.write_text("\n".join(lines) + "\n")


def write_summary(root: Path) -> None:
    """summary.md: lowbit / best peer for every model benchmarked under ``root`` (one results.json per folder)."""
    import json

    lines = [
        "# lowbit / best peer, every model", "",
        "Per model and method: lowbit's median perplexity, wall time and peak RSS over the best peer's (below 1 is "
        "better for lowbit; the perplexity target is at most 1.005). Each model's own report.md has the values.", "",
        "| model | groups | seeds | method | perplexity | time | peak RSS |", "|---|---:|---|---|---:|---:|---:|",
    ]
    for path in sorted(root.glob("*/results.json")):
        results = json.loads(path.read_text())
        for m in _methods(results):
            ratios = [_ratio(results, m, key, PEERS) for key in ("perplexity", "median_wall_seconds",
                                                                  "median_peak_rss_bytes")]
            if any(ratios):
                lines.append(f"| {results['model']} | {results['group_size']} | {_seeds(results)} | {m} | "
                             + " | ".join(ratios) + " |")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
