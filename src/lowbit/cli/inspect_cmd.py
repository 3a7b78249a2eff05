"""`lowbit inspect`: see a model's activation outliers on calibration text, and what each grid does to them.

Nothing is changed. Writes inspect.json, channels.safetensors (per-channel absmax and mean |x| of every input) and
three PNGs to --out, and prints the findings and tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.cli.common import (
    add_calibration_options, add_model_options, add_number, calibration_from_args, console, default_model,
    parse_device, torch_dtype,
)
from lowbit.errors import LowbitError
from lowbit.io.atomic import refuse_non_directory, refuse_unsafe_target, report_folder, write_atomic, write_json_atomic
from lowbit.schema import Range

INSPECT_JSON = "inspect.json"
CHANNELS_FILE = "channels.safetensors"  # per-channel absmax and mean |x| of every input, for your own analysis


def register(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser(
        "inspect", aliases=["outliers"],
        help="activation outliers per layer, grid usage (zero share) per granularity, salient weights; JSON + plots",
    )
    o.add_argument("model_arg", nargs="?", metavar="MODEL", help="HF folder, .gguf file, or 'smollm2-135m' (default)")
    o.add_argument("--model", default=default_model(), help=argparse.SUPPRESS)
    o.add_argument("--out", default="out/inspect", help="folder for inspect.json and the PNG plots (default out/inspect)")
    add_number(o, "--threshold", float, Range(0, open_low=True), default=6.0,
               help="outlier if max |x| above this (default 6.0, LLM.int8())")
    add_number(o, "--ratio", float, Range(1, open_low=True), default=20.0,
               help="outlier if max |x| above this many median channels (default 20)")
    add_number(o, "--alpha", float, Range(0, 1), default=0.5, help="SmoothQuant migration strength for 'smoothed' (default 0.5)")
    add_number(o, "--sample-tokens", int, Range(1), default=512, help="tokens kept per input for grid usage (default 512)")
    o.add_argument("--json", action="store_true", help="print the whole inspection as JSON instead of tables")
    add_model_options(o)
    add_calibration_options(o)
    o.set_defaults(func=run_inspect, nsamples=16)


def run_inspect(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from lowbit.evaluation.inspect_plots import write_plots
    from lowbit.evaluation.inspect_summary import inputs_table, inspection_json, kind_table, residual_table
    from lowbit.models.lazy import LazyModel
    from lowbit.models.source import resolve_model
    from lowbit.pipeline.compute import compute_dtype
    from lowbit.pipeline.inspect import InspectSettings, inspect_model
    from lowbit.pipeline.loop import LazyStore

    model = args.model_arg or args.model
    source = resolve_model(model)
    if source.is_lowbit:
        raise LowbitError(f"{model} is a lowbit output; inspect the original model instead")
    refuse_non_directory(Path(args.out))
    refuse_unsafe_target(Path(args.out), inputs=[Path(model)])
    settings = InspectSettings(threshold=args.threshold, ratio=args.ratio, smooth_alpha=args.alpha,
                               sample_tokens=args.sample_tokens)
    ids = calibration_from_args(args, source.folder)
    store = LazyStore(LazyModel(source.folder, torch_dtype(args.dtype)), on_block_done=lambda prefix, block: None)
    with tqdm(total=len(store.blocks), desc="inspecting blocks", unit="block") as bar:
        inspection = inspect_model(store, ids, settings, batch_size=args.batch_size, device=parse_device(args.device),
                                   on_block=lambda i: bar.update(), compute_dtype=compute_dtype(args.compute_dtype))
    report = inspection_json(inspection)
    title = f"{model}: {ids.shape[0]} x {ids.shape[1]} calibration tokens"
    with report_folder(Path(args.out), inputs=[Path(model)]) as out:
        write_json_atomic(out / INSPECT_JSON, report)
        write_atomic(out / CHANNELS_FILE, lambda tmp: save_file(inspection.channel_tensors(), tmp))
        plots = write_plots(inspection, title, out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console.print(residual_table(inspection))
    console.print(inputs_table(inspection))
    console.print(kind_table(inspection))
    for line in report["findings"]:
        console.print(f"- {line}")
    console.print(f"written: {out / INSPECT_JSON}, {out / CHANNELS_FILE}, " + ", ".join(str(p) for p in plots))
    return 0
