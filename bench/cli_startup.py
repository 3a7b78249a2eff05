"""CLI start-up time: wall seconds of `lowbit --help`, `lowbit quantize --help`, `lowbit quantize --nsamples 0` (an
argument error) and `lowbit recipes`, each run REPEATS times in a fresh process after one untimed warm-up run
(bytecode compiled, files in the page cache), median reported. The goal is under 1 s each: these answer before any
model is read, so they import neither torch nor transformers (tests/test_cli_startup.py).

Prints a table with the machine (CPU model, its kernel-relevant instruction sets, core count, load average before
and after: another job on the machine slows every figure) and writes bench/results/cli_startup.json; results under
other labels are kept, the same label's are replaced. The machine record comes from lowbit's own
``machine_description``, in a separate process before the timed runs.

Usage: .venv/bin/python bench/cli_startup.py [--label after] [--repeats 5]
To time another tree (e.g. a copy of src/ before a change): PYTHONPATH=/copy/src .venv/bin/python bench/cli_startup.py --label before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cli_startup.json"

# command -> the exit code it must end with
COMMANDS: dict[str, int] = {
    "lowbit --help": 0,
    "lowbit quantize --help": 0,
    "lowbit quantize --nsamples 0": 2,
    "lowbit recipes": 0,
}


def lowbit_command() -> list[str]:
    """The installed `lowbit` script next to this interpreter (what a user runs), else `python -m lowbit.cli.main`."""
    script = Path(sys.executable).parent / "lowbit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lowbit.cli.main"]


def machine() -> dict[str, object]:
    """lowbit's machine record (CPU model, kernel-relevant instruction sets, torch), from a separate, untimed process:
    importing it here would put torch in this process, which is harmless, but keeps the timed runs honest to read."""
    code = "import json; from lowbit.evaluation.speed import machine_description; print(json.dumps(machine_description()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cpus": os.cpu_count(), "python": platform.python_version()}


def lowbit_source() -> str:
    """The lowbit package the timed processes import (PYTHONPATH included), found without importing it."""
    code = "import importlib.util; print(importlib.util.find_spec('lowbit').origin)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def wall_seconds(argv: list[str], expected_code: int) -> float:
    start = time.perf_counter()
    child = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if child.returncode != expected_code:
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode}, expected {expected_code}:\n{child.stderr}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5)")
    args = parser.parse_args()

    lowbit = lowbit_command()
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {}
    for command, code in COMMANDS.items():
        argv = lowbit + command.split()[1:]
        wall_seconds(argv, code)  # warm-up, not counted
        seconds[command] = [round(wall_seconds(argv, code), 4) for _ in range(args.repeats)]
    load_after = os.getloadavg()

    run = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lowbit": lowbit_source(),
        "machine": machine(),
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "repeats": args.repeats,
        "median_seconds": {c: round(statistics.median(s), 3) for c, s in seconds.items()},
        "seconds": seconds,
    }
    m = run["machine"]
    print(f"{m['cpu']} ({', '.join(m['isa']) or 'no listed ISA'}), {m['cpus']} CPUs, load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f}; lowbit from {run['lowbit']}")
    print(f"{'command':<32} median s ({args.repeats} runs)   [label {args.label}]")
    for command, median in run["median_seconds"].items():
        print(f"{command:<32} {median:8.3f}")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {"commands": list(COMMANDS), "runs": {**results.get("runs", {}), args.label: run}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
