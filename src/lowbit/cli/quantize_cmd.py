"""`lowbit quantize`: one model, one recipe, one output directory (optionally also GGUF or compressed-tensors)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from lowbit.cli.common import (
    add_calibration_options, add_model_options, add_number, calibration_from_args, console, default_model,
    parse_device, peak_rss_bytes, torch_dtype,
)
from lowbit.errors import LowbitError
from lowbit.evaluation.units import mib
from lowbit.pipeline.report import QuantizeReport, layer_table
from lowbit.preset_names import check_recipe_name
from lowbit.schema import Range

if TYPE_CHECKING:
    import torch

    from lowbit.distributed.ranks import Ranks
    from lowbit.models.source import ModelSource
    from lowbit.recipe import Recipe


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model with a recipe into an output directory")
    q.add_argument("--model", default=default_model(), help="HF folder, .gguf file, or 'smollm2-135m' (default)")
    q.add_argument("--recipe", type=check_recipe_name, default="w4g128",
                   help="preset name (see `lowbit recipes`) or a JSON recipe file")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument(
        "--transforms", metavar="DIR",
        help="re-apply the SmoothQuant/AWQ scales and clips saved in an earlier output DIR instead of searching again",
    )
    q.add_argument("--format", choices=("lowbit", "gguf", "compressed-tensors", "gptq"), default="lowbit",
                   help="also write OUT/model.gguf (Q8_0/Q4_0/Q4_1; needs a g32 grid, checked before quantizing), "
                        "OUT/compressed-tensors/ (vLLM; weight-only and W8A8 recipes) or OUT/gptq/ (a GPTQ "
                        "checkpoint; INT2/3/4/8 weight-only recipes)")
    q.add_argument("--measure", action="store_true",
                   help="run the calibration text through data-free recipes too (RTN, magnitude pruning, LLM.int8(), "
                        "dynamic W8A8), to report per-layer errors; without it they need no forward pass")
    add_number(q, "--budget", float, Range(1.0, 16.0, open_low=True), default=None, metavar="BITS",
               help="mixed precision: choose each Linear's grid (2-8 bits, groups of 32-128, around the recipe's "
                    "grid) by its measured sensitivity so that the blocks' Linears store BITS bits per weight, scales "
                    "included (e.g. 3.5); the plan is written into the output's recipe (docs/mixed_precision.md)")
    q.add_argument("--verbose", action="store_true", help="print a row per Linear, not only per block")
    q.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_nproc_option(q)
    add_model_options(q)
    add_calibration_options(q)
    q.set_defaults(func=run_quantize)


@dataclass
class QuantizeRun:
    report: QuantizeReport
    out: Path
    source_bytes: int
    out_bytes: int
    peak_rss: int
    linear_bits: float | None = None  # stored bits per weight of the blocks' Linears (integer grids only)

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "recipe": self.report.recipe,
            "calibration": self.report.calibration,
            "seconds": round(self.report.seconds, 2),
            "phase_seconds": {k: round(v, 2) for k, v in self.report.phase_seconds().items()},
            "source_bytes": self.source_bytes,
            "out_bytes": self.out_bytes,
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_after_phase": self.report.peak_rss,
            "mean_linear_error": self.report.mean_linear_error() if self.report.measured else None,
            "linear_bits_per_weight": self.linear_bits,
        }


def add_nproc_option(parser: argparse.ArgumentParser) -> None:
    add_number(parser, "--nproc", int, Range(1), default=1,
               help="calibrate on N processes of this machine (torch.distributed: gloo on CPUs, one GPU each with "
                    "--device cuda); the result equals one process's (docs/distributed.md). Default 1")


def checked_request(
    args: argparse.Namespace, out: Path, recipe_name: str, writes: bool = True
) -> tuple[Recipe, ModelSource]:
    """The recipe and model of a `quantize` command, checked (cheap checks, one line each) before any work; the
    output folder only where it is written (rank 0 of a distributed run)."""
    from lowbit.export.compressed_tensors import check_recipe_for_compressed_tensors
    from lowbit.export.gguf import check_recipe_for_gguf
    from lowbit.export.gptq_checkpoint import check_recipe_for_gptq
    from lowbit.io.atomic import check_output_dir
    from lowbit.models.source import resolve_model
    from lowbit.presets import resolve_recipe

    device = parse_device(args.device)
    if device.type == "cuda" and args.nproc > 1:
        import torch

        if args.nproc > torch.cuda.device_count():
            raise LowbitError(f"--nproc {args.nproc} with --device cuda needs {args.nproc} GPUs, this machine shows "
                              f"{torch.cuda.device_count()}; lower --nproc")
    recipe = resolve_recipe(recipe_name)
    if getattr(args, "budget", None) is not None:
        recipe = recipe.with_budget(args.budget)
    if args.transforms:
        recipe = recipe.reusing_transforms(args.transforms)
    if writes:
        check_output_dir(out, args.overwrite, inputs=[Path(args.model)])
    source = resolve_model(args.model)
    if source.is_lowbit:
        raise LowbitError(f"{args.model} is already a lowbit output; quantize the original model instead")
    if args.format == "gguf":
        check_recipe_for_gguf(recipe, source.folder)
    if args.format == "compressed-tensors":
        check_recipe_for_compressed_tensors(recipe)
    if args.format == "gptq":
        check_recipe_for_gptq(recipe)
    return recipe, source


def quantize_from_args(
    args: argparse.Namespace, out: Path, recipe_name: str, ranks: Ranks | None = None,
    device: torch.device | None = None,
) -> QuantizeRun:
    """Calibrate and quantize as the CLI options say (as one rank of several when ``ranks`` says so)."""
    from lowbit.api import quantize_checkpoint
    from lowbit.distributed.ranks import SINGLE
    from lowbit.models.checkpoint import CheckpointReader
    from lowbit.pipeline.compute import compute_dtype

    ranks = ranks or SINGLE
    recipe, source = checked_request(args, out, recipe_name, writes=ranks.writes)
    device = device or parse_device(args.device)
    ids = None
    if recipe.needs_calibration or args.measure:
        ids = calibration_from_args(args, source.folder)
    report = quantize_checkpoint(
        source.folder, recipe, ids, out, dtype=torch_dtype(args.dtype), device=device, batch_size=args.batch_size,
        seed=args.seed, overwrite=args.overwrite, progress=ranks.writes, ranks=ranks,
        compute_dtype=compute_dtype(args.compute_dtype),
    )
    out_bytes = CheckpointReader(out).nbytes() if ranks.writes else 0
    linear_bits = stored_linear_bits(out, report) if ranks.writes else None
    return QuantizeRun(report, out, CheckpointReader(source.folder).nbytes(), out_bytes, peak_rss_bytes(), linear_bits)


def stored_linear_bits(out: Path, report: QuantizeReport) -> float | None:
    """Stored bits per weight of the Linears the run compressed (its report's rows), from output ``out``'s
    lowbit_config.json; None where one is not on an integer grid."""
    from lowbit.api import read_lowbit_config
    from lowbit.numerics.bit_budget import linear_bits_per_weight

    names = [row.name for block in report.blocks for row in block.linears]
    return linear_bits_per_weight(read_lowbit_config(out)["modules"], names)


def run_quantize(args: argparse.Namespace) -> int:
    from lowbit.distributed.ranks import join_ranks, launched_world, leave_ranks

    world = launched_world()[1]
    if args.nproc > 1 and world == 1:
        from lowbit.distributed.launch import launch, strip_nproc

        checked_request(args, Path(args.out), args.recipe)  # a bad request is one line before any rank starts
        return launch(strip_nproc(args.argv), args.nproc, Path(args.out))
    if args.nproc > 1 and args.nproc != world:
        raise LowbitError(f"--nproc {args.nproc} inside a run of {world} ranks (torchrun); drop --nproc")
    ranks, device = join_ranks(parse_device(args.device))
    try:
        run = quantize_from_args(args, Path(args.out), args.recipe, ranks, device)
    finally:
        leave_ranks()
    if not ranks.writes:
        return 0
    return report_run(args, run)


def report_run(args: argparse.Namespace, run: QuantizeRun) -> int:
    """Exports asked for, then the summary (JSON or the per-layer table)."""
    from lowbit.api import load
    from lowbit.export.compressed_tensors import CT_DIR, write_compressed_tensors
    from lowbit.export.gguf import GGUF_FILE, write_gguf
    from lowbit.export.gptq_checkpoint import GPTQ_DIR, write_gptq

    if args.format == "gguf":
        write_gguf(run.out, load(run.out), run.out / GGUF_FILE)
    if args.format == "compressed-tensors":
        write_compressed_tensors(run.out, load(run.out), run.out / CT_DIR)
    if args.format == "gptq":
        write_gptq(run.out, load(run.out), run.out / GPTQ_DIR)
    if args.json:
        print(json.dumps(run.summary(), indent=2))
        return 0
    console.print(layer_table(run.report, per_linear=args.verbose))
    cal = run.report.calibration
    data = f"{cal['n_sequences']} x {cal['seq_len']} calibration tokens" if run.report.measured else (
        "data-free, no calibration pass (--measure reports errors)")
    console.print(
        f"[bold]{run.report.recipe['name']}[/bold]: {data}, "
        f"{run.report.seconds:.1f}s, peak RSS {mib(run.peak_rss)}, "
        f"{mib(run.source_bytes)} -> {mib(run.out_bytes)} on disk, written to {run.out}"
    )
    phases = run.report.phase_seconds()
    console.print("time per phase, all blocks: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    return 0

