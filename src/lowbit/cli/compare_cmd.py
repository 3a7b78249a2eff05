"""`lowbit compare`: one model, several recipes (named, or a methods x bits x group-sizes sweep), the same
calibration and evaluation text for every row, written as results.json, report.md, report.html and PNG plots, with
a recommendation computed from the rows and from an outlier diagnosis (`lowbit inspect`) of the same calibration
text. `lowbit demo` is compare on the embedded default with two recipes.

Each recipe is quantized in a child process (`lowbit quantize --json`), so every row's peak RSS is that run's own
rather than the maximum of everything the parent did before it. Recipes whose SmoothQuant/AWQ step equals an
earlier row's re-apply that row's saved scales instead of searching again (``--no-reuse-transforms`` to search
each time). The results are rewritten after every row; ``--resume`` keeps the rows of an earlier run with the same
settings, so a long comparison can be continued.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from rich.table import Table

from lowbit.cli.common import (
    add_calibration_options, add_eval_options, add_model_options, add_number, add_task_options,
    calibration_from_args, child_command, console, default_model, parse_device, run_child, task_options, torch_dtype,
)
from lowbit.cli.inspect_cmd import INSPECT_JSON
from lowbit.cli.quantize_cmd import add_nproc_option, stored_linear_bits
from lowbit.errors import LowbitError
from lowbit.io.atomic import refuse_non_directory, refuse_unsafe_target, report_folder, write_text_atomic
from lowbit.pipeline.report import QuantizeReport
from lowbit.preset_names import (
    FIT_SUFFIXES, PRESETS, ROTATED_SWEEP_METHODS, SWEEP_METHODS, check_recipe_name, parse_recipe_name,
    split_rotation,
)
from lowbit.schema import Range, check_record, read_json

if TYPE_CHECKING:
    import torch

    from lowbit.methods.base import Step
    from lowbit.recipe import Recipe

DEMO_RECIPES = ("w8", "w4g128")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="quantize one model with several recipes and compare them in one report")
    c.add_argument("model_arg", nargs="?", metavar="MODEL", help="HF folder, .gguf file, or 'smollm2-135m' (default)")
    c.add_argument("--model", default=default_model(), help=argparse.SUPPRESS)
    c.add_argument("--recipes", nargs="+", type=check_recipe_name, default=[],
                   help="presets or JSON recipe files, one row each")
    c.add_argument("--methods", nargs="+", default=[], choices=SWEEP_METHODS + ROTATED_SWEEP_METHODS,
                   help="weight-only methods to sweep (rotate-/quarot- before one: rotated first)")
    add_number(c, "--bits", int, Range(2, 8), nargs="+", default=[4], help="bit widths of the sweep (default 4)")
    add_number(c, "--group-sizes", int, Range(0), nargs="+", default=[128],
               help="group sizes of the sweep, 0 = per-channel (default 128)")
    c.add_argument("--fits", nargs="+", default=["range"], choices=list(FIT_SUFFIXES.values()),
                   help="grid fits of the sweep: min-max range, or a searched range (default range)")
    c.add_argument("--out", required=True, help="folder for the quantized models (one sub-folder per recipe)")
    c.add_argument("--no-reuse-transforms", action="store_true", help="search SmoothQuant/AWQ scales in every row")
    c.add_argument("--no-inspect", action="store_true", help="skip the outlier diagnosis behind the recommendation")
    add_nproc_option(c)
    _add_shared(c)
    add_task_options(c)
    c.set_defaults(func=run_compare)

    d = sub.add_parser("demo", help="the embedded default model: full precision vs W8 per-channel vs W4 g128 RTN")
    d.add_argument("--recipes", nargs="+", type=check_recipe_name, default=list(DEMO_RECIPES),
                   help="presets to run (default: w8 w4g128)")
    d.add_argument("--out", default="out/demo", help="folder for the quantized models and results (default out/demo)")
    _add_shared(d)
    # RTN needs no statistics: a small calibration set only feeds the per-layer error table; 4 evaluation windows
    # of 2048 tokens (8,192 tokens) separate the rows clearly and keep the whole demo within a few minutes on 2 cores
    # (--max-windows 16 for the results table's figures)
    d.set_defaults(func=run_compare, model=default_model(), model_arg=None, nsamples=16, max_windows=4, methods=[],
                   bits=[4], group_sizes=[128], fits=["range"], no_reuse_transforms=False, no_inspect=True, tasks=None,
                   tasks_dir=None, limit=None, num_fewshot=None, task_batch_size=8)


def _add_shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", help="folder for results.json/.md/.png (default: --out)")
    parser.add_argument("--resume", action="store_true", help="keep rows of an earlier run with identical settings")
    add_model_options(parser)
    add_calibration_options(parser)
    add_eval_options(parser)


def quantize_in_child(args: argparse.Namespace, recipe: str, out: Path, transforms: Path | None = None) -> dict[str, Any]:
    """Run `lowbit quantize --json` in a fresh process; returns its summary (peak RSS included)."""
    command = [
        *child_command("quantize"), "--model", args.model, "--recipe", recipe,
        "--out", str(out), "--overwrite", "--json", "--measure", "--dtype", args.dtype, "--device", args.device,
        "--calib", args.calib, "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--compute-dtype", args.compute_dtype,
        *(["--transforms", str(transforms)] if transforms else []),
        *(["--nproc", str(args.nproc)] if getattr(args, "nproc", 1) > 1 else []),  # demo has no --nproc
    ]
    return json.loads(run_child(command, f"`lowbit quantize --recipe {recipe}`"))


def row_name(recipe: str) -> str:
    """Recipes by name ("gptq-w4g128-b3.5" keeps its dot), recipe files by file stem."""
    return Path(recipe).stem if parse_recipe_name(recipe)[0] == "file" else recipe


def planned_recipes(args: argparse.Namespace, out: Path) -> dict[str, tuple[str, Recipe]]:
    """Row name -> (what the child is given, the recipe): named recipes first, then the sweep. Every recipe is
    built (and so checked) before anything is written; sweep points that are not presets go to out/recipes/."""
    from lowbit.presets import resolve_recipe, sweep_recipe

    recipes = {row_name(r): (r, resolve_recipe(r)) for r in args.recipes}
    sweep = [sweep_recipe(m, b, g, fit=f) for m in args.methods for b in args.bits for g in args.group_sizes
             for f in args.fits]
    if not recipes and not sweep:
        raise LowbitError("nothing to compare: pass --recipes NAME... and/or --methods METHOD... [--bits] [--group-sizes]")
    for recipe in sweep:
        if recipe.name in recipes:
            continue
        if recipe.name in PRESETS and resolve_recipe(recipe.name) == recipe:
            recipes[recipe.name] = (recipe.name, recipe)
            continue
        recipes[recipe.name] = (str(out / "recipes" / f"{recipe.name}.json"), recipe)
    return recipes


def write_sweep_recipes(recipes: dict[str, tuple[str, Recipe]], out: Path) -> None:
    """The sweep points that are not presets, as JSON files the child processes are given."""
    for spec, recipe in recipes.values():
        path = Path(spec)
        if path.parent == out / "recipes":
            path.parent.mkdir(exist_ok=True)
            write_text_atomic(path, recipe.to_json())


def transform_step(recipe: Recipe) -> Step | None:
    """The search step whose result (scales, clips) a later row with the same step can re-apply. None where the
    recipe plans a grid per Linear (its step searched on those grids, not on the step's own) or transforms the block
    before it (a rotation: its scales were searched on the rotated model)."""
    step = recipe.transform
    planned = recipe.budget is not None or bool(recipe.plan)
    alone = recipe.block_transforms == (step,)
    return step if step is not None and getattr(step, "artifact", None) is None and not planned and alone else None


class _Diagnosis(TypedDict):
    """What a comparison reads from inspect.json (the recommendation quotes its findings)."""

    findings: list[str]


def output_report(folder: Path) -> QuantizeReport | None:
    """A quantized folder's report (checked against the report's own dataclasses: a resumed row may point at a
    folder someone edited); None where it has none."""
    from lowbit.io.writer import REPORT_FILE

    path = folder / REPORT_FILE
    if not path.exists():
        return None
    fix = f"delete {folder} and run the comparison again"
    data = read_json(path, "quantize report", fix)
    check_record(data, QuantizeReport, str(path), fix)
    return QuantizeReport.from_dict(data)


def block_errors(folder: Path) -> list[float]:
    """Mean relative Linear output error per block, from a quantized folder's report."""
    report = output_report(folder)
    return [] if report is None else [sum(r.rel_error for r in b.linears) / max(len(b.linears), 1) for b in report.blocks]


def inspect_in_child(args: argparse.Namespace, folder: Path, reuse: bool) -> dict[str, Any]:
    """`lowbit inspect` on the same calibration text, in a fresh process; its inspect.json."""
    path = folder / INSPECT_JSON
    if reuse and path.exists():
        return read_diagnosis(path)
    command = [
        *child_command("inspect"), args.model, "--out", str(folder), "--json", "--dtype", args.dtype, "--device",
        args.device, "--calib", args.calib, "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed),
    ]
    run_child(command, "`lowbit inspect`", capture=False)
    return read_diagnosis(path)


def read_diagnosis(path: Path) -> dict[str, Any]:
    """inspect.json, checked for what the recommendation quotes (a reused one may be from an interrupted run)."""
    fix = f"delete {path.parent} and run the comparison again"
    diagnosis = read_json(path, "inspect report", fix)
    check_record(diagnosis, _Diagnosis, str(path), fix)
    return diagnosis


def recipe_description(name: str, recipe: Recipe) -> str:
    """A preset's description (a rotated preset's too), else the recipe's label."""
    rotation = split_rotation(name)
    if rotation is not None and rotation[1] in PRESETS:
        online, inner = rotation
        rotated = "residual stream and o_proj/down_proj inputs rotated (QuaRot)" if online else "residual stream rotated"
        return f"{rotated}, then {PRESETS[inner]}"
    return PRESETS.get(name, recipe.label)


def run_compare(args: argparse.Namespace) -> int:
    from lowbit.models.source import resolve_model

    args.model = args.model_arg or args.model
    device, dtype = parse_device(args.device), torch_dtype(args.dtype)
    out = Path(args.out)
    results_dir = Path(args.results) if args.results else out
    for folder, option in ((out, "--out"), (results_dir, "--results")):
        refuse_non_directory(folder, option)
        refuse_unsafe_target(folder, [Path(args.model)], option)
    recipes = planned_recipes(args, out)
    args.task_options = task_options(args)
    if args.task_options:  # unknown tasks and unreachable task data before any row is quantized
        from lowbit.evaluation.tasks import load_task_data, task_manager

        load_task_data(args.task_options, task_manager(args.task_options))
    # the calibration text is checked against the model here, not by the first child after the baseline is measured
    calibration_from_args(args, resolve_model(args.model).folder)
    with ExitStack() as held:
        for folder, option in {out: "--out", results_dir: "--results"}.items():
            held.enter_context(report_folder(folder, [Path(args.model)], option))
        write_sweep_recipes(recipes, out)
        return compare(args, recipes, out, results_dir, device, dtype)


def compare(
    args: argparse.Namespace, recipes: dict[str, tuple[str, Recipe]], out: Path, results_dir: Path,
    device: torch.device, dtype: torch.dtype,
) -> int:
    """Measure the baseline and every recipe, writing the results after each row (see run_compare)."""
    from tqdm.auto import tqdm

    from lowbit.evaluation.comparison import REPORT_MD, reusable_rows, write_results
    from lowbit.evaluation.evaluate import evaluate
    from lowbit.evaluation.recommend import recommendations
    from lowbit.evaluation.speed import machine_description
    from lowbit.io.writer import ARTIFACT_FILE
    from lowbit.recipe import Recipe

    max_windows = args.max_windows or None
    settings = {
        "calibration": {"text": args.calib, "n_sequences": args.nsamples, "seq_len": args.seq_len, "seed": args.seed,
                        "batch_size": args.batch_size},
        "evaluation": {"text": args.data, "window": args.window, "max_windows": max_windows},
        "dtype": args.dtype,
        "machine": machine_description(device),
    }
    tasks = args.task_options
    if tasks:  # only then: earlier results without tasks keep their settings, and so stay resumable
        settings["tasks"] = {"names": list(tasks.names), "dir": str(tasks.tasks_dir) if tasks.tasks_dir else None,
                             "limit": tasks.limit, "num_fewshot": tasks.num_fewshot}
    earlier = reusable_rows(results_dir, settings, args.model) if args.resume else {}
    results: dict[str, Any] = {"model": args.model, "settings": settings, "rows": []}

    def measure(spec: str) -> dict[str, Any]:
        return evaluate(spec, args.data, args.window, max_windows, dtype, device, progress=True, tasks=tasks).summary()

    base = earlier.get(args.dtype)
    results["rows"].append(base or {"recipe": args.dtype, "description": "unquantized", "config": None, **measure(args.model)})
    diagnosis = None if args.no_inspect else inspect_in_child(args, results_dir / "inspect", reuse=bool(earlier))
    searched: dict[Any, str] = {}  # transform step -> the row whose output holds its scales
    with tqdm(total=len(recipes), desc="compare", unit="recipe") as bar:
        for name, (spec, recipe) in recipes.items():
            step = transform_step(recipe)
            source = None if args.no_reuse_transforms or step is None else searched.get(step)
            row = earlier.get(name)
            # compare parsed recipes, so a field added since (with its default) does not invalidate a measured row
            if row is None or row.get("config") is None or Recipe.from_dict(row["config"], stored=True) != recipe:
                console.print(f"[bold]{name}[/bold]: quantizing" + (f" (re-using {source}'s scales)" if source else ""))
                summary = quantize_in_child(args, spec, out / name, out / source if source else None)
                row = {
                    "recipe": name, "description": recipe_description(name, recipe), "config": recipe.to_dict(),
                    **measure(str(out / name)),
                    "quantize_seconds": summary["seconds"], "peak_rss_bytes": summary["peak_rss_bytes"],
                    "mean_linear_error": summary["mean_linear_error"], "block_errors": block_errors(out / name),
                    "linear_bits_per_weight": summary["linear_bits_per_weight"],
                    "transforms_from": source,
                }
            # a kept row's description is derived text: today's, not the one it was measured with
            row = {**row, "description": recipe_description(name, recipe)}
            if not row.get("block_errors"):  # rows measured before per-block errors were recorded
                row = {**row, "block_errors": block_errors(out / name)}
            report = None if "linear_bits_per_weight" in row else output_report(out / name)
            if report is not None:  # ... or sizes per weight
                row = {**row, "linear_bits_per_weight": stored_linear_bits(out / name, report)}
            if step is not None and step not in searched and not row.get("transforms_from"):
                if (out / name / ARTIFACT_FILE).exists():
                    searched[step] = name
            results["rows"].append(row)
            # after every row, with the earlier run's rows not reached yet: an interrupted run loses nothing measured
            pending = [earlier[n] for n in list(recipes)[len(results["rows"]) - 1 :] if n in earlier]
            write_results({**results, "rows": results["rows"] + pending}, results_dir, diagnosis)
            bar.update()
    console.print(results_table(results))
    console.print("[bold]Recommendation[/bold]")
    for line in recommendations(results, diagnosis):
        console.print(f"- {line}")
    console.print(f"report written to {results_dir / REPORT_MD} (and report.html, results.json, PNG plots)")
    return 0


def results_table(results: dict[str, Any]) -> Table:
    from lowbit.evaluation.comparison import comparison_cells

    rows = results["rows"]
    base = rows[0]
    table = Table(title=f"{results['model']}: perplexity on held-out text ({base['windows']} x {base['window']} tokens)")
    table.add_column("recipe")
    for column in comparison_cells(base, base):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["recipe"], *comparison_cells(r, base).values())
    return table
