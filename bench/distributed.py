"""Data-parallel calibration on this machine: `lowbit quantize` of the embedded SmolLM2-135M with each method's
preset as one process of one thread and as ``--nproc N`` processes of one thread each (and, for the
``--all-cores`` recipes, as one process using every core: the default without --nproc), calibrated on 64 x 512
tokens of `wiki` in batches of 8 (the README results' calibration). Times: the command's wall time (start-up
included) and the quantize loop's own. The outputs of one and N processes are compared (share of packed integer
words and of float values identical, largest float difference) and evaluated (perplexity, 8 windows of 2048 tokens
of the embedded evaluation text). Writes bench/results/distributed.json.

    .venv/bin/python bench/distributed.py [--nproc 2] [--recipes gptq-w4g128 ...]     (about 40 minutes here)

``--summation-control`` (after a run) measures what a different floating-point summation order alone does to each
given recipe in one process: batches of 4 instead of 8 (the same sequences; every sum over tokens is ordered
differently, as it is across ranks), compared with the one-process output the same way (added to its row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distributed.json"
WORK = ROOT / "out" / "bench" / "distributed"
RECIPES = ("gptq-w4g128", "awq-w4g128", "smoothquant-w8a8-static", "wanda-50", "sparsegpt-50")
NSAMPLES = 64


def quantize(recipe: str, out: Path, nproc: int, threads: int, batch_size: int = 8) -> dict:
    command = [sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--recipe", recipe, "--out", str(out),
               "--overwrite", "--json", "--nproc", str(nproc), "--nsamples", str(NSAMPLES), "--batch-size",
               str(batch_size)]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.PIPE,
                          text=True, check=True)
    wall = time.perf_counter() - start
    summary = json.loads(done.stdout)
    return {"processes": nproc, "threads_each": threads, "wall_seconds": round(wall, 1),
            "loop_seconds": summary["seconds"], "peak_rss_rank0_bytes": summary["peak_rss_bytes"]}


def agreement(a: Path, b: Path) -> dict:
    """How far the N-process checkpoint is from the one-process one."""
    import torch
    from safetensors.torch import load_file

    words = same_words = floats = same_floats = 0
    largest = 0.0
    for shard in sorted(a.glob("*.safetensors")):
        x, y = load_file(shard), load_file(b / shard.name)
        for name, t in x.items():
            u = y[name]
            if t.shape != u.shape:  # a pruned Linear kept another number of weights: all of it differs
                floats, words = (floats + t.numel(), words) if t.is_floating_point() else (floats, words + t.numel())
                continue
            if t.is_floating_point():
                floats += t.numel()
                same_floats += int((t == u).sum())
                largest = max(largest, float((t.float() - u.float()).abs().max()) if t.numel() else 0.0)
            else:
                words += t.numel()
                same_words += int((t == u).sum())
    return {"integer_words_identical": same_words / max(words, 1), "float_values_identical": same_floats / max(floats, 1),
            "largest_float_difference": largest}


def perplexity(folder: Path) -> float:
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "--quiet", "eval", str(folder), "--max-windows",
                           "8", "--json"], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)["perplexity"]


def compare_only(recipes: list[str], nproc: int) -> int:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    for recipe in recipes:
        one, many = WORK / f"{recipe}-1", WORK / f"{recipe}-{nproc}"
        row = {"recipe": recipe, "timing": "not measured", **agreement(one, many), "perplexity_1": perplexity(one),
               "perplexity_n": perplexity(many)}
        data["rows"] = [r for r in data["rows"] if r["recipe"] != recipe] + [row]
        print(f"{recipe:24s} words identical {row['integer_words_identical']:.4%}  floats identical "
              f"{row['float_values_identical']:.4%}  ppl {row['perplexity_1']:.4f} / {row['perplexity_n']:.4f}")
    RESULTS.write_text(json.dumps(data, indent=2))
    return 0


def summation_control(recipes: list[str], cores: int) -> int:
    data = json.loads(RESULTS.read_text())
    for row in data["rows"]:
        if row["recipe"] not in recipes:
            continue
        one, control = WORK / f"{row['recipe']}-1", WORK / f"{row['recipe']}-1-batch4"
        run = quantize(row["recipe"], control, 1, cores, batch_size=4)
        row["summation_control"] = {"batch_size": 4, "run": run, **agreement(one, control),
                                    "perplexity": perplexity(control)}
        c = row["summation_control"]
        print(f"{row['recipe']:24s} batch 4 vs 8, one process: words identical {c['integer_words_identical']:.4%}  "
              f"floats identical {c['float_values_identical']:.4%}  ppl {row['perplexity_1']:.4f} / "
              f"{c['perplexity']:.4f}", flush=True)
    RESULTS.write_text(json.dumps(data, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--all-cores", nargs="*", default=["gptq-w4g128"],
                        help="recipes also run as one process on every core (default: gptq-w4g128)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only compare and evaluate the outputs an earlier run left (no timing)")
    parser.add_argument("--summation-control", action="store_true",
                        help="only the batch-size-4 control of each recipe (after a run; see the header)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    WORK.mkdir(parents=True, exist_ok=True)
    if args.summation_control:
        return summation_control(args.recipes, cores)
    if args.compare_only:
        return compare_only(args.recipes, args.nproc)
    rows = []
    for recipe in args.recipes:
        one = WORK / f"{recipe}-1"
        many = WORK / f"{recipe}-{args.nproc}"
        single, split = quantize(recipe, one, 1, 1), quantize(recipe, many, args.nproc, 1)
        row = {"recipe": recipe, "one_process_one_thread": single, "n_processes_one_thread": split,
               "speedup": single["loop_seconds"] / split["loop_seconds"], **agreement(one, many),
               "perplexity_1": perplexity(one), "perplexity_n": perplexity(many)}
        line = (f"{recipe:24s} loop 1x1t {single['loop_seconds']:7.1f}s  {args.nproc}x1t {split['loop_seconds']:7.1f}s "
                f"(x{row['speedup']:.2f})")
        if recipe in args.all_cores:
            row["one_process_all_cores"] = quantize(recipe, WORK / f"{recipe}-1-all-cores", 1, cores)
            line += f"  1x{cores}t {row['one_process_all_cores']['loop_seconds']:7.1f}s"
        rows.append(row)
        print(f"{line}  words identical {row['integer_words_identical']:.4%}  floats identical "
              f"{row['float_values_identical']:.4%} (largest difference {row['largest_float_difference']:.1e})  "
              f"ppl {row['perplexity_1']:.4f} / {row['perplexity_n']:.4f}", flush=True)
    from lowbit.evaluation.speed import machine_description

    # rows of recipes not run this time are kept (a re-run of one recipe replaces its row only)
    earlier = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = [r for r in earlier if r["recipe"] not in args.recipes] + rows
    RESULTS.write_text(json.dumps({"machine": machine_description(), "cores": cores, "nproc": args.nproc,
                                   "calibration": f"{NSAMPLES} x 512 tokens (wiki), batch 8", "rows": rows}, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
