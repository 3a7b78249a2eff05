"""Shared CLI plumbing: options, device and dtype parsing, memory readings, output formatting."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
from rich.console import Console

from lowbit.errors import LowbitError
from lowbit.models.embedded import DEFAULT_MODEL, DEFAULT_TEXT

console = Console()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the unquantized tensors (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where each block is processed")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default=DEFAULT_TEXT, help="calibration text: 'wiki' (embedded) or a .txt/.jsonl/.json file or datasets dir")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences N (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence L (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the calibration sample (default 0)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_TEXT, help="evaluation text source (its evaluation part is used)")
    parser.add_argument("--window", type=int, default=2048, help="perplexity window length in tokens (default 2048)")
    parser.add_argument("--max-windows", type=int, default=16, help="evaluate at most this many windows; 0 = all (default 16)")


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LowbitError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is VmHWM, the high-water mark of this program's own address space. getrusage's ru_maxrss is not
    used there: a child started by fork/vfork + exec inherits the parent's high-water mark in it, so a `lowbit
    quantize` launched by `lowbit compare` right after an evaluation reported the parent's 1.7 GB, not its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child_command(command: str) -> list[str]:
    """The start of the argv of a `lowbit COMMAND` run in a fresh process (its own peak memory, its own imports)."""
    return [sys.executable, "-m", "lowbit.cli.main", "--quiet", command]


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def default_model() -> str:
    return DEFAULT_MODEL
