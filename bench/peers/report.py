"""bench/results/peers/report.md from results.json: perplexity per tool, then wall time and peak RSS medians, each
with lowbit's ratio to the best peer (lower is better for all three) and, for time and memory, to llm-compressor
(the issue's targets: at most 0.5)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PEERS = ("llmcompressor", "gptqmodel")
NAMES = {"lowbit": "lowbit", "lowbit-bf16": "lowbit, bf16 forwards", "llmcompressor": "llm-compressor",
         "gptqmodel": "GPTQModel"}


def _value(results: dict, tool: str, method: str, key: str) -> float | None:
    row = results["rows"].get(tool, {}).get(method)
    if row is None or "error" in row:
        return None
    return row.get(key)


def _cell(results: dict, tool: str, method: str, key: str, fmt: str) -> str:
    row = results["rows"].get(tool, {}).get(method)
    if row is None:
        return "not run"
    if "error" in row:
        return "failed (see JSON)"
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
    lines = [
        "# lowbit next to llm-compressor and GPTQModel",
        "",
        f"Embedded SmolLM2-135M-Instruct (float32 input), calibration {n} x {length} token ids (sha "
        f"{results['calibration_sha']}), perplexity by lowbit's evaluator on {windows} windows of {window} tokens (sha "
        f"{results['evaluation_sha']}){f', fp32 {fp:.3f}' if fp else ''}. Machine: {results['machine']}; "
        f"date {results.get('date', '')}. Times and peak RSS are medians over the repeats listed in results.json, each "
        "a fresh process from start to exit (model load and save included). Ratios are lowbit / best peer: "
        "below 1 is better for lowbit.",
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
