"""Where calibration time goes: each recipe quantized in a fresh `lowbit quantize --json` process with the pass
cache off (LOWBIT_PASS_CACHE_MIB=0) and on, in float32 and with bfloat16 forwards (--compute-dtype), and the
run's own per-phase seconds (capture, load, transform or reference pass, statistics passes, compress, final pass,
write) printed side by side. Same model and calibration ids as the peer benchmark (bench/peers/prepare.py: the
float32 SmolLM2-135M, 16 x 512 token ids, written to out/peers/); `lowbit quantize` draws the same ids from the
same text and seed. Writes bench/results/calibration_profile.json and prints a Markdown table.

    OMP_NUM_THREADS=2 .venv/bin/python bench/calibration_profile.py [--recipes gptq-w4g64 ...] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "out" / "peers" / "smollm2-135m" / "model"
WORK = ROOT / "out" / "bench" / "profile"
RESULTS = ROOT / "bench" / "results" / "calibration_profile.json"
SETTINGS = {  # name -> (pass cache MiB, compute dtype)
    "no cache": ("0", "float32"),
    "cache": ("1024", "float32"),
    "cache, bf16 forwards": ("1024", "bfloat16"),
}


def run(recipe: str, cache_mib: str, compute: str) -> dict:
    out = WORK / recipe
    command = [sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--model", str(MODEL), "--recipe",
               recipe, "--nsamples", "16", "--seq-len", "512", "--out", str(out), "--overwrite", "--json",
               "--compute-dtype", compute]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "LOWBIT_PASS_CACHE_MIB": cache_mib}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"calibration_profile: {recipe} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(done.stdout)
    return {"wall_seconds": wall, "seconds": summary["seconds"], "phase_seconds": summary["phase_seconds"],
            "peak_rss_bytes": summary["peak_rss_bytes"], "mean_linear_error": summary["mean_linear_error"]}


def median_run(runs: list[dict]) -> dict:
    """The run with the median block-loop time (its phases add up)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def table(results: dict) -> str:
    phases: list[str] = []
    for rows in results["rows"].values():
        for row in rows.values():
            phases += [p for p in row["median"]["phase_seconds"] if p not in phases]
    lines = ["| recipe | setting | process wall | block loop | " + " | ".join(phases) + " | peak RSS |",
             "|---|---|" + "---:|" * (len(phases) + 3)]
    for recipe, rows in results["rows"].items():
        for setting, row in rows.items():
            m = row["median"]
            cells = [f"{m['phase_seconds'].get(p, 0.0):.1f}" for p in phases]
            lines.append(f"| {recipe} | {setting} | {statistics.median(row['wall_seconds']):.1f} s | {m['seconds']:.1f} s | "
                         + " | ".join(cells) + f" | {m['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["gptq-w4g64", "smoothquant-w8a8", "sparsegpt-50"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not MODEL.is_dir():
        raise SystemExit(f"calibration_profile: {MODEL} is missing; run .venv/bin/python bench/peers/prepare.py first")
    from lowbit.evaluation.speed import machine_description

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    results.update({"machine": machine_description("cpu"), "date": f"{datetime.date.today()}",
                    "calibration": "16 x 512 (bench/peers)"})
    for recipe in args.recipes:
        for setting in args.settings:
            runs = []
            for repeat in range(args.repeats):
                print(f"[{datetime.datetime.now():%H:%M:%S}] {recipe}, {setting} ({repeat + 1})", flush=True)
                runs.append(run(recipe, *SETTINGS[setting]))
            results["rows"].setdefault(recipe, {})[setting] = {
                "wall_seconds": [round(r["wall_seconds"], 2) for r in runs], "median": median_run(runs)}
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
