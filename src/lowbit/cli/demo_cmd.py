"""`lowbit demo`: the embedded default model, full precision vs W8 per-channel vs W4 g128 RTN, in one table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from lowbit.cli.common import (
    DTYPES, add_calibration_options, add_eval_options, add_model_options, console, default_model, mib, parse_device,
)
from lowbit.cli.quantize_cmd import evaluation_row, quantize_from_args
from lowbit.evaluation.evaluate import evaluate

DEMO_RECIPES = ("w8", "w4g128")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="quantize the embedded default model (W8, W4 g128) and compare with full precision")
    d.add_argument("--out", default="out/demo", help="where the quantized models and results go (default out/demo)")
    d.add_argument("--recipes", nargs="+", default=list(DEMO_RECIPES), help="presets to run (default: w8 w4g128)")
    add_model_options(d)
    add_calibration_options(d)
    add_eval_options(d)
    # W8 and W4 RTN need no statistics: a small calibration set only feeds the per-layer error table
    d.set_defaults(func=run_demo, overwrite=True, model=default_model(), nsamples=32)


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = parse_device(args.device), DTYPES[args.dtype]
    max_windows = args.max_windows or None

    def measure(spec: str) -> dict:
        return evaluation_row(evaluate(spec, args.data, args.window, max_windows, dtype, device, progress=True))

    rows = [{"recipe": "fp32", **measure(args.model), "quantize_seconds": 0.0, "peak_rss_bytes": None}]
    for name in args.recipes:
        run = quantize_from_args(args, out / name, name)
        rows.append({"recipe": name, **measure(str(out / name)), "quantize_seconds": round(run.report.seconds, 1),
                     "peak_rss_bytes": run.peak_rss})
    results = {"model": args.model, "calibration": f"{args.nsamples} x {args.seq_len} tokens of {args.calib}", "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(results))
    console.print(f"results written to {out / 'results.json'}")
    return 0


def results_table(results: dict) -> Table:
    rows = results["rows"]
    base = rows[0]
    table = Table(title=f"{results['model']}: perplexity on held-out Wikipedia ({base['windows']} x {base['window']} tokens)")
    for column in ("recipe", "perplexity", "delta", "size on disk", "ratio", "quantize s", "load s", "eval s"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for r in rows:
        delta = (r["perplexity"] / base["perplexity"] - 1) * 100
        table.add_row(
            r["recipe"], f"{r['perplexity']:.3f}", f"{delta:+.2f}%", mib(r["disk_bytes"]),
            f"{base['disk_bytes'] / r['disk_bytes']:.2f}x", f"{r['quantize_seconds']:.1f}", f"{r['load_seconds']:.2f}",
            f"{r['eval_seconds']:.1f}",
        )
    return table
