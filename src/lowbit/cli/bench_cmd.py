"""`lowbit bench`: load time, resident memory and prefill / decode throughput of quantized models, against the
fp32 and bf16 baselines of the same model in the same run, printed as ratios. A benchmark, not a test.

Each model is measured in its own child process (`lowbit bench SPEC --single`), so its resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from lowbit.cli.common import (
    DTYPES, add_number, child_command, console, default_model, parse_device, run_child, torch_dtype,
)
from lowbit.evaluation.units import mib
from lowbit.io.atomic import refuse_non_directory, report_folder, write_json_atomic, write_text_atomic
from lowbit.runtime.backends import BACKENDS
from lowbit.schema import Range

BENCH_JSON = "runtime.json"
BENCH_MD = "runtime.md"


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="memory and prefill/decode speed of models against fp32 and bf16 baselines")
    b.add_argument("models", nargs="+", help="lowbit output directories (or any model lowbit opens)")
    b.add_argument("--baseline", default=default_model(), help="the unquantized model, measured in float32 and bfloat16")
    b.add_argument("--results", help="folder for runtime.json and runtime.md")
    add_number(b, "--prefill-tokens", int, Range(1), default=512,
               help="prompt length of the prefill measurement (default 512)")
    add_number(b, "--new-tokens", int, Range(2), default=32, help="tokens generated per decode measurement (default 32)")
    add_number(b, "--repeats", int, Range(1), default=3, help="timed runs per figure, median reported (default 3)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--backends", nargs="+", choices=BACKENDS, default=["exact", "fast"],
                   help="runtime backends to measure each model with (default: both)")
    b.add_argument("--backend", choices=BACKENDS, default="exact", help=argparse.SUPPRESS)  # child mode
    b.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # child mode: one model, JSON on stdout
    b.add_argument("--dtype", choices=DTYPES, default=None, help=argparse.SUPPRESS)
    b.set_defaults(func=run_bench)


def measure_one(spec: str, dtype: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Open one model in this process and measure it (the child side)."""
    import torch

    from lowbit.api import open_model
    from lowbit.data.calibration import check_positions
    from lowbit.evaluation.evaluate import tensor_bytes
    from lowbit.evaluation.speed import measure_speed
    from lowbit.models.checkpoint import CheckpointReader
    from lowbit.pipeline.memory import resident_bytes

    device = parse_device(args.device)
    before = resident_bytes()
    start = time.perf_counter()
    opened = open_model(spec, torch_dtype(dtype) if dtype else None, device, backend=args.backend)
    load_seconds = time.perf_counter() - start
    after = resident_bytes()
    vocab = opened.model.get_input_embeddings().num_embeddings
    check_positions(args.prefill_tokens + args.new_tokens, opened.model.config, "--prefill-tokens + --new-tokens")
    speed = measure_speed(opened.model, vocab, prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
                          repeats=args.repeats)
    return {
        "model": spec, "dtype": dtype or "as stored", "backend": args.backend if opened.source.is_lowbit else "-",
        "disk_bytes": CheckpointReader(opened.source.folder).nbytes(),
        "tensor_bytes": tensor_bytes(opened.model), "load_seconds": round(load_seconds, 3), "resident_bytes_after_load": after,
        "model_resident_bytes": after - before, "prefill_tokens_per_second": round(speed.prefill_tokens_per_second, 1),
        "decode_tokens_per_second": {str(b): round(v, 2) for b, v in speed.decode_tokens_per_second.items()},
        "threads": torch.get_num_threads(),
    }


def measure_in_child(spec: str, dtype: str | None, args: argparse.Namespace, backend: str = "exact") -> dict[str, Any]:
    command = [*child_command("bench"), spec, "--single", "--device", args.device,
               "--backend", backend,
               "--prefill-tokens", str(args.prefill_tokens), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), *(["--dtype", dtype] if dtype else [])]
    return json.loads(run_child(command, f"measuring {spec}"))


def run_bench(args: argparse.Namespace) -> int:
    from lowbit.evaluation.speed import machine_description
    from lowbit.models.source import resolve_model

    if args.single:
        print(json.dumps(measure_one(args.models[0], args.dtype, args)))
        return 0
    for spec in [args.baseline, *args.models]:
        resolve_model(spec)  # every path checked before the first measurement
    if args.results:
        refuse_non_directory(Path(args.results), "--results")
    rows = [measure_in_child(args.baseline, "float32", args), measure_in_child(args.baseline, "bfloat16", args)]
    rows += [measure_in_child(spec, None, args, backend) for spec in args.models for backend in args.backends]
    table = runtime_table(rows)
    console.print(table)
    if args.results:
        machine = machine_description(parse_device(args.device))
        with report_folder(Path(args.results), option="--results") as folder:
            write_json_atomic(folder / BENCH_JSON, {"device": args.device, "machine": machine, "rows": rows})
            write_text_atomic(folder / BENCH_MD, runtime_markdown(rows))
        console.print(f"written: {folder / BENCH_JSON}, {folder / BENCH_MD}")
    return 0


def runtime_cells(row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """One runtime-table row's display cells; speeds as ratios to ``base`` (the fp32 baseline) next to their values."""
    def rate(value: float, ref: float) -> str:
        return f"{value:,.1f} ({value / ref:.2f}x)"

    decode = row["decode_tokens_per_second"]
    return [
        Path(row["model"]).name or row["model"], row["dtype"], row.get("backend", "-"), mib(row["disk_bytes"]), mib(row["tensor_bytes"]),
        mib(row["model_resident_bytes"]),
        f"{row['load_seconds']:.2f} s", rate(row["prefill_tokens_per_second"], base["prefill_tokens_per_second"]),
        *(rate(decode[b], base["decode_tokens_per_second"][b]) for b in decode),
    ]


def _header(rows: list[dict[str, Any]]) -> list[str]:
    batches = list(rows[0]["decode_tokens_per_second"])
    return ["model", "dtype", "backend", "on disk", "tensors in memory", "RSS growth at load", "load", "prefill tok/s (vs fp32)",
            *(f"decode b{b} tok/s (vs fp32)" for b in batches)]


def runtime_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"runtime, {rows[0]['threads']} threads")
    for i, column in enumerate(_header(rows)):
        table.add_column(column, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*runtime_cells(row, rows[0]))
    return table


def runtime_markdown(rows: list[dict[str, Any]]) -> str:
    header = _header(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    lines += ["| " + " | ".join(runtime_cells(row, rows[0])) + " |" for row in rows]
    return "\n".join(lines) + "\n"
