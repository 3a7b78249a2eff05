"""Shared CLI plumbing: options, device and dtype parsing, memory readings, child processes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from lowbit.data.text import DEFAULT_TEXT
from lowbit.errors import LowbitError
from lowbit.models.embedded import DEFAULT_MODEL
from lowbit.schema import Range

if TYPE_CHECKING:
    import torch

    from lowbit.evaluation.tasks import TaskOptions

# Registering the options (`lowbit --help`, an argument error) imports no torch, transformers or numpy: what needs
# them is imported by the function that uses it (tests/test_cli_startup.py).

console = Console()
DTYPES = ("float32", "bfloat16", "float16")  # --dtype NAME; torch_dtype(NAME) when a run needs the torch.dtype
SEEDS = Range(0, 2**32 - 1)  # what every seeded generator (torch, random, numpy) accepts


def _bounded(option: str, kind: type[int] | type[float], allowed: Range) -> Callable[[str], int | float]:
    """An argparse ``type=`` for a number option: a value outside ``allowed`` (NaN and infinities included) is
    lowbit's one-line error, naming the option, the value and the range. Text that is no number at all keeps
    argparse's own message (argparse only catches ValueError, so the LowbitError reaches ``main``)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if value not in allowed:
            raise LowbitError(f"{option} {text} is out of range; need {option} {allowed}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" names the type by it
    return parse


def add_number(
    parser: argparse.ArgumentParser, option: str, kind: type[int] | type[float], allowed: Range, **kwargs
) -> None:
    """``parser.add_argument(option, ...)`` for a number that must lie in ``allowed``."""
    parser.add_argument(option, type=_bounded(option, kind, allowed), **kwargs)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the unquantized tensors (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where each block is processed")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default=DEFAULT_TEXT, help="calibration text: 'wiki' (embedded) or a .txt/.jsonl/.json file or datasets dir")
    add_number(parser, "--nsamples", int, Range(1), default=128, help="calibration sequences N (default 128)")
    add_number(parser, "--seq-len", int, Range(2), default=512, help="tokens per calibration sequence L (default 512)")
    add_number(parser, "--batch-size", int, Range(1), default=8, help="sequences per forward pass (default 8)")
    add_number(parser, "--seed", int, SEEDS, default=0, help="seed for the calibration sample (default 0)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the calibration forwards; statistics stay float32. bfloat16 is faster "
                             "where the hardware has it (AVX-512 BF16 / AMX CPUs, GPUs): docs/speed.md (default float32)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_TEXT, help="evaluation text source (its evaluation part is used)")
    add_number(parser, "--window", int, Range(2), default=2048, help="perplexity window length in tokens (default 2048)")
    add_number(parser, "--max-windows", int, Range(0), default=16,
               help="evaluate at most this many windows; 0 = all (default 16)")


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness task accuracy beside perplexity (lowbit[eval])."""
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy): their accuracy "
                        "beside perplexity; needs pip install 'lowbit[eval]'")
    parser.add_argument("--tasks-dir", help="folder of task YAMLs searched before lm-eval's own (local tasks)")
    add_number(parser, "--limit", int, Range(1), help="at most this many examples per task (default: all)")
    add_number(parser, "--num-fewshot", int, Range(0), help="few-shot examples per prompt (default: each task's own)")
    add_number(parser, "--task-batch-size", int, Range(1), default=8, help="sequences per forward in tasks (default 8)")


def task_options(args: argparse.Namespace) -> TaskOptions | None:
    """The TaskOptions of --tasks and its companions; None without --tasks (companions alone are refused)."""
    from lowbit.evaluation.tasks import TaskOptions, parse_task_names

    if args.tasks is None:
        given = [o for o, v in (("--tasks-dir", args.tasks_dir), ("--limit", args.limit),
                                ("--num-fewshot", args.num_fewshot)) if v is not None]
        if given:
            raise LowbitError(f"{given[0]} applies to task accuracy only; add --tasks NAME[,NAME...]")
        return None
    return TaskOptions(parse_task_names(args.tasks), Path(args.tasks_dir) if args.tasks_dir else None, args.limit,
                       args.num_fewshot, args.task_batch_size)


def torch_dtype(name: str) -> torch.dtype:
    """The torch.dtype of a --dtype NAME (one of DTYPES)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def calibration_from_args(args: argparse.Namespace, folder: Path) -> torch.Tensor:
    """Calibration ids [--nsamples, --seq-len] from --calib for the model in ``folder``; ids the model cannot embed
    (past its vocabulary or its learned positions) are refused here, before any forward pass."""
    from lowbit.data.calibration import calibration_ids, check_ids_fit_model
    from lowbit.data.text import documents
    from lowbit.models.lazy import load_config
    from lowbit.models.tokenizer import load_tokenizer

    ids = calibration_ids(load_tokenizer(folder), documents(args.calib, "calibration"), args.nsamples, args.seq_len,
                          args.seed)
    check_ids_fit_model(ids, load_config(folder))
    return ids


def parse_device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LowbitError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM on Linux: pipeline/peak_rss.py)."""
    from lowbit.pipeline.peak_rss import high_water_bytes

    return high_water_bytes()


def child_command(command: str) -> list[str]:
    """The start of the argv of a `lowbit COMMAND` run in a fresh process (its own peak memory, its own imports)."""
    return [sys.executable, "-m", "lowbit.cli.main", "--quiet", command]


def run_child(command: list[str], what: str, capture: bool = True) -> str:
    """Run a child lowbit process (``child_command``) and return its stdout; its stderr (progress, its own one-line
    error) passes through. A failure is one line here too. When this process is stopped (Ctrl-C, SIGTERM, SIGHUP:
    see io/atomic.signals_as_exceptions) the child is asked to stop as well and awaited, so it removes its own
    partial output before this process exits."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, text=True)
    try:
        out, _ = child.communicate()
    except BaseException:
        child.terminate()
        child.wait()
        raise
    if child.returncode != 0:
        raise LowbitError(f"{what} failed with exit code {child.returncode}; its error is above")
    return out or ""


def default_model() -> str:
    return DEFAULT_MODEL
