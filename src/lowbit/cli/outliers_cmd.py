"""`lowbit outliers`: diagnose activation outliers of a model on calibration text (nothing is changed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from lowbit.cli.common import DTYPES, add_calibration_options, add_model_options, console, default_model, parse_device
from lowbit.data.calibration import calibration_ids
from lowbit.data.text import documents
from lowbit.errors import LowbitError
from lowbit.evaluation.outlier_plot import plot_outliers
from lowbit.models.lazy import LazyModel
from lowbit.models.open import load_tokenizer
from lowbit.models.source import resolve_model
from lowbit.pipeline.diagnose import InputOutliers, diagnose_outliers
from lowbit.pipeline.loop import LazyStore


def register(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser("outliers", help="per-Linear activation outlier statistics on calibration text, with a plot")
    o.add_argument("--model", default=default_model(), help="HF folder, .gguf file, or 'smollm2-135m' (default)")
    o.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold to count (default 6.0)")
    o.add_argument("--plot", help="write a PNG: outlier ratio across depth and the worst input's channel profile")
    o.add_argument("--json", action="store_true", help="print every row as JSON")
    add_model_options(o)
    add_calibration_options(o)
    o.set_defaults(func=run_outliers, nsamples=16)


def run_outliers(args: argparse.Namespace) -> int:
    source = resolve_model(args.model)
    if source.is_lowbit:
        raise LowbitError(f"{args.model} is a lowbit output; diagnose the original model instead")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise LowbitError(f"--plot {args.plot}: its folder does not exist; create it first")
    ids = calibration_ids(load_tokenizer(source.folder), documents(args.calib, "calibration"), args.nsamples,
                          args.seq_len, args.seed)
    store = LazyStore(LazyModel(source.folder, DTYPES[args.dtype]), on_block_done=lambda prefix, block: None)
    results, absmax = diagnose_outliers(
        store, ids, threshold=args.threshold, batch_size=args.batch_size, device=parse_device(args.device)
    )
    if args.plot:
        plot_outliers(results, absmax, f"{args.model}: activation outliers ({ids.shape[0]} x {ids.shape[1]} tokens)", Path(args.plot))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    console.print(outlier_table(results, args.threshold))
    worst = max(results, key=lambda r: r.ratio)
    flagged = sum(r.channels_over_threshold > 0 for r in results)
    console.print(
        f"{len(results)} distinct Linear inputs; {flagged} have channels above |x| > {args.threshold:g}; the most "
        f"stretched is {worst.name} (max/median channel {worst.ratio:,.0f}x: a per-tensor INT8 grid leaves its "
        f"typical channel {worst.median_int8_levels:.1f} levels)" + (f"; plot written to {args.plot}" if args.plot else "")
    )
    return 0


def outlier_table(results: list[InputOutliers], threshold: float) -> Table:
    table = Table(title="activation outliers per Linear input")
    columns = ("input of", "max |x|", "median channel", "max/median", "INT8 levels (median ch.)",
               f"channels > {threshold:g}", "top channels")
    for column in columns:
        table.add_column(column, justify="left" if column in ("input of", "top channels") else "right")
    for r in results:
        name = r.name + (f" (+{', '.join(r.shared_with)})" if r.shared_with else "")
        table.add_row(
            name, f"{r.max_abs:,.2f}", f"{r.median_channel_absmax:,.3f}", f"{r.ratio:,.1f}", f"{r.median_int8_levels:.1f}",
            str(r.channels_over_threshold), ", ".join(map(str, r.top_channels)),
        )
    return table
