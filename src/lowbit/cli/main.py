"""The `lowbit` command. It only parses options into configs; library code never sees argparse.

Building the parser imports no torch, transformers or numpy (tests/test_cli_startup.py): `lowbit --help`, a
subcommand's --help and a bad option answer in a fraction of a second; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lowbit.errors import LowbitError
from lowbit.io.atomic import Terminated


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


def configure_logging(quiet: bool, transformers: bool = True) -> None:
    """Logs to stderr; with ``transformers``, its warnings and progress bars off (a command that loads no model
    leaves transformers unimported)."""
    from rich.console import Console
    from rich.logging import RichHandler

    # logs go to stderr: stdout carries results, which --json makes machine-readable
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )
    if transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    # lowbit works from local files only: make sure no library reaches for the network and hangs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        # a number out of its range or an unknown recipe name is a LowbitError (cli/common.py, preset_names.py)
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` starts again in every rank
        loads_models = getattr(args, "loads_models", True)  # False: `lowbit recipes` (set_defaults)
        # ranks other than 0 of a distributed run keep quiet: rank 0 speaks for the run
        configure_logging(args.quiet or os.environ.get("RANK", "0") not in ("", "0"), transformers=loads_models)
        if loads_models:
            from lowbit.pipeline.memory import prefer_mmap_for_large_allocations

            prefer_mmap_for_large_allocations()
        return int(args.func(args) or 0)
    except LowbitError as exc:
        say(f"lowbit: error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("lowbit: interrupted; no partial output was left behind")
        return 130
    except Terminated as exc:
        say(f"lowbit: stopped by {exc}; no partial output was left behind")
        return 128 + exc.signum


def say(line: str) -> None:
    """The one line a failed run ends with: on stderr, or, in a rank started by `--nproc`, into the file its
    launcher reads (the launcher prints one line for the whole run: distributed/launch.py)."""
    error_file = os.environ.get("LOWBIT_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                f.write(line + "\n")
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
