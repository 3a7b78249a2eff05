"""`lowbit compare`: one model, several recipes, the same calibration and evaluation text for every row, written
as results.json, results.md and results.png. `lowbit demo` is compare on the embedded default with two recipes.

Each recipe is quantized in a child process (`lowbit quantize --json`), so every row's peak RSS is that run's own
rather than the maximum of everything the parent did before it. The results file is rewritten after every row;
``--resume`` keeps the rows of an earlier run with the same settings, so a long comparison can be continued.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from lowbit.cli.common import (
    DTYPES, add_calibration_options, add_eval_options, add_model_options, console, default_model, parse_device,
)
from lowbit.errors import LowbitError
from lowbit.evaluation.comparison import RESULTS_MD, reusable_rows, row_cells, write_results
from lowbit.evaluation.evaluate import evaluate
from lowbit.presets import preset_names, resolve_recipe
from lowbit.recipe import Recipe

DEMO_RECIPES = ("w8", "w4g128")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="quantize one model with several recipes and compare them in one table")
    c.add_argument("--model", default=default_model(), help="HF folder, .gguf file, or 'smollm2-135m' (default)")
    c.add_argument("--recipes", nargs="+", required=True, help="presets or JSON recipe files, one row each")
    c.add_argument("--out", required=True, help="folder for the quantized models (one sub-folder per recipe)")
    _add_shared(c)
    c.set_defaults(func=run_compare)

    d = sub.add_parser("demo", help="the embedded default model: full precision vs W8 per-channel vs W4 g128 RTN")
    d.add_argument("--recipes", nargs="+", default=list(DEMO_RECIPES), help="presets to run (default: w8 w4g128)")
    d.add_argument("--out", default="out/demo", help="folder for the quantized models and results (default out/demo)")
    _add_shared(d)
    # RTN needs no statistics: a small calibration set only feeds the per-layer error table
    d.set_defaults(func=run_compare, model=default_model(), nsamples=32)


def _add_shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", help="folder for results.json/.md/.png (default: --out)")
    parser.add_argument("--resume", action="store_true", help="keep rows of an earlier run with identical settings")
    add_model_options(parser)
    add_calibration_options(parser)
    add_eval_options(parser)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{os.cpu_count()} CPU cores (torch {torch.__version__})"


def quantize_in_child(args: argparse.Namespace, recipe: str, out: Path) -> dict[str, Any]:
    """Run `lowbit quantize --json` in a fresh process; returns its summary (peak RSS included)."""
    command = [
        sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--model", args.model, "--recipe", recipe,
        "--out", str(out), "--overwrite", "--json", "--dtype", args.dtype, "--device", args.device,
        "--calib", args.calib, "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed),
    ]
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr (progress, errors) passes through
    if child.returncode != 0:
        raise LowbitError(f"`lowbit quantize --recipe {recipe}` failed with exit code {child.returncode}; its error is above")
    return json.loads(child.stdout)


def row_name(recipe: str) -> str:
    """Presets by name, recipe files by file stem."""
    return recipe if recipe in preset_names() else Path(recipe).stem


def run_compare(args: argparse.Namespace) -> int:
    device, dtype = parse_device(args.device), DTYPES[args.dtype]
    recipes = {row_name(r): (r, resolve_recipe(r)) for r in args.recipes}  # every recipe checked before any work
    out = Path(args.out)
    results_dir = Path(args.results) if args.results else out
    out.mkdir(parents=True, exist_ok=True)
    max_windows = args.max_windows or None
    settings = {
        "calibration": {"text": args.calib, "n_sequences": args.nsamples, "seq_len": args.seq_len, "seed": args.seed,
                        "batch_size": args.batch_size},
        "evaluation": {"text": args.data, "window": args.window, "max_windows": max_windows},
        "dtype": args.dtype,
        "machine": machine_description(device),
    }
    earlier = reusable_rows(results_dir, settings, args.model) if args.resume else {}
    results: dict[str, Any] = {"model": args.model, "settings": settings, "rows": []}

    def measure(spec: str) -> dict[str, Any]:
        return evaluate(spec, args.data, args.window, max_windows, dtype, device, progress=True).summary()

    base = earlier.get(args.dtype)
    results["rows"].append(base or {"recipe": args.dtype, "description": "unquantized", "config": None, **measure(args.model)})
    for name, (spec, recipe) in recipes.items():
        row = earlier.get(name)
        # compare parsed recipes, so a field added since (with its default) does not invalidate a measured row
        if row is None or row.get("config") is None or Recipe.from_dict(row["config"]) != recipe:
            console.print(f"[bold]{name}[/bold]: quantizing")
            summary = quantize_in_child(args, spec, out / name)
            row = {
                "recipe": name, "description": preset_names().get(name, spec), "config": recipe.to_dict(),
                **measure(str(out / name)),
                "quantize_seconds": summary["seconds"], "peak_rss_bytes": summary["peak_rss_bytes"],
                "mean_linear_error": summary["mean_linear_error"],
            }
        results["rows"].append(row)
        # after every row, with the earlier run's rows not reached yet: an interrupted run loses nothing measured
        pending = [earlier[n] for n in list(recipes)[len(results["rows"]) - 1 :] if n in earlier]
        write_results({**results, "rows": results["rows"] + pending}, results_dir)
    console.print(results_table(results))
    console.print(f"results written to {results_dir / RESULTS_MD} (and .json, .png)")
    return 0


def results_table(results: dict[str, Any]) -> Table:
    rows = results["rows"]
    base = rows[0]
    table = Table(title=f"{results['model']}: perplexity on held-out text ({base['windows']} x {base['window']} tokens)")
    table.add_column("recipe")
    for column in row_cells(base, base):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["recipe"], *row_cells(r, base).values())
    return table
