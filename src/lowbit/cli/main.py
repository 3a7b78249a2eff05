"""The `lowbit` command. It only parses options into configs; library code never sees argparse."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lowbit.errors import LowbitError
from lowbit.io.atomic import Terminated
from lowbit.pipeline.memory import prefer_mmap_for_large_allocations


def build_parser() -> argparse.ArgumentParser:
    from lowbit.cli import (
        bench_cmd, compare_cmd, eval_cmd, export_cmd, generate_cmd, inspect_cmd, quantize_cmd, recipes_cmd,
    )

    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training compression of Hugging Face causal LMs.")
    parser.add_argument("--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (quantize_cmd, eval_cmd, compare_cmd, inspect_cmd, generate_cmd, bench_cmd, export_cmd, recipes_cmd):
        module.register(sub)
    return parser


def configure_logging(quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler
    from transformers.utils import logging as hf_logging

    # logs go to stderr: stdout carries results, which --json makes machine-readable
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    # lowbit works from local files only: make sure no library reaches for the network and hangs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)  # a number out of its range is a LowbitError (cli/common.py)
        configure_logging(args.quiet)
        prefer_mmap_for_large_allocations()
        return int(args.func(args) or 0)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"lowbit: stopped by {exc}; no partial output was left behind", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
