"""GPTQ's column order and group formation, measured: lowbit's GPTQ W4 (asymmetric, groups of --group-size) in
every variant the peers use, on the peer benchmark's shared inputs of each model and calibration seed, evaluated by
the benchmark's one evaluator. The variants differ in three choices:

- visiting order: columns left to right, or by descending H_jj (act-order);
- group formation: groups of consecutive columns (a group's columns are those of one packed block), or groups of
  consecutive columns in the visiting order (desc_act: a g_idx per column);
- when a group's grid (scale, zero) is fitted: lazily, from the error-updated weights when the sweep enters the
  group (the GPTQ paper, GPTQModel), or up front from the original weights (llm-compressor 0.14, every mode).

  variant        order      groups       fitted     who does it
  column         columns    columns      lazily     GPTQ paper, GPTQModel desc_act=False, lowbit gptq-w4gG
  column-upfront columns    columns      up front   llm-compressor actorder=None
  desc           H_jj       visit order  lazily     GPTQModel desc_act=True, lowbit static_groups=False
  desc-upfront   H_jj       visit order  up front   llm-compressor's "group" order (removed in 0.14)
  weight         H_jj       columns      up front   llm-compressor "weight", GPTQModel static_groups

and each of column, desc and weight again with the Hessian's off-diagonal shrunk toward zero by 10% (-shrink:
GPTQ(shrink=0.1), docs/actorder.md). lowbit's gptq-w4gG-actorder presets are weight-shrink.

Writes bench/results/peers/actorder.json (every run: seed, perplexity, wall seconds) and prints a table of
median perplexities over the seeds. A run already in the JSON with the same command line is reused.

  usage: .venv/bin/python bench/peers/actorder.py --models smollm2-135m qwen2.5-coder-0.5b [--seeds 0 1 2]
             [--variants column desc weight] [--group-size 128]   (after bench/peers/prepare.py per model)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import time
from pathlib import Path

from run import evaluate
from shared import MODELS, REPO, WORK, ids_file, model_folder

RESULTS = REPO / "bench" / "results" / "peers" / "actorder.json"
VARIANTS = {
    "column": {},
    "column-upfront": {"upfront_groups": True},
    "desc": {"act_order": True, "static_groups": False},
    "desc-upfront": {"act_order": True, "static_groups": False, "upfront_groups": True},
    "weight": {"act_order": True, "static_groups": True},
    # the same three with the Hessian's off-diagonal shrunk by 10% (GPTQ(shrink=0.1))
    "column-shrink": {"shrink": 0.1},
    "desc-shrink": {"act_order": True, "static_groups": False, "shrink": 0.1},
    "weight-shrink": {"act_order": True, "static_groups": True, "shrink": 0.1},
}


def recipe_file(variant: str, group: int) -> Path:
    path = WORK / "actorder" / f"{variant}-g{group}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    step = {"type": "gptq", "bits": 4, "symmetric": False, "granularity": "group", "group_size": group,
            **VARIANTS[variant]}
    path.write_text(json.dumps({"name": f"gptq-w4g{group}-{variant}", "steps": [step], "ignore": ["lm_head"]}))
    return path


def run(model: str, variant: str, seed: int, group: int, nsamples: int, seq_len: int) -> dict:
    out = WORK / "actorder" / model / f"{variant}-g{group}-seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(REPO / ".venv" / "bin" / "lowbit"), "--quiet", "quantize", "--model", str(model_folder(model)),
               "--recipe", str(recipe_file(variant, group)), "--nsamples", str(nsamples), "--seq-len", str(seq_len),
               "--seed", str(seed), "--out", str(out), "--overwrite", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"actorder: {variant} on {model} seed {seed} failed: {done.stderr.strip()[-300:]}")
    result = evaluate("lowbit", out, ids_file(model, seed))
    if "error" in result:
        raise SystemExit(f"actorder: evaluating {variant} on {model} seed {seed} failed: {result['error']}")
    return {"command": " ".join(command[3:]), "seed": seed, "perplexity": result["perplexity"],
            "wall_seconds": round(wall, 1), "date": f"{datetime.date.today()}"}


def table(results: dict, group: int) -> str:
    lines = [f"| model (g{group}, median over seeds) | " + " | ".join(VARIANTS) + " |",
             "|---|" + "---:|" * len(VARIANTS)]
    for model, runs in results.get("models", {}).items():
        cells = []
        for variant in VARIANTS:
            values = [r["perplexity"] for r in runs.get(f"{variant}-g{group}", [])]
            cells.append(f"{statistics.median(values):.3f} (n={len(values)})" if values else "")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(results: dict, group: int) -> str:
    """Each seed's perplexity per variant (the medians' inputs: whether an ordering holds seed by seed)."""
    lines = ["| model | seed | " + " | ".join(VARIANTS) + " |", "|---|---:|" + "---:|" * len(VARIANTS)]
    for model, runs in results.get("models", {}).items():
        seeds = sorted({r["seed"] for variant in VARIANTS for r in runs.get(f"{variant}-g{group}", [])})
        for seed in seeds:
            cells = [next((f"{r['perplexity']:.3f}" for r in runs.get(f"{variant}-g{group}", []) if r["seed"] == seed),
                          "") for variant in VARIANTS]
            lines.append(f"| {model} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    models = results.setdefault("models", {})
    for seed in args.seeds:  # every variant on seed s before any on seed s + 1: a cut-short run is balanced
        for model in args.models:
            for variant in args.variants:
                runs = models.setdefault(model, {}).setdefault(f"{variant}-g{args.group_size}", [])
                if any(r["seed"] == seed for r in runs):
                    continue
                print(f"[{datetime.datetime.now():%H:%M:%S}] {model} {variant} seed {seed}", flush=True)
                row = run(model, variant, seed, args.group_size, args.nsamples, args.seq_len)
                runs.append(row)
                print(f"  perplexity {row['perplexity']:.3f}, {row['wall_seconds']} s", flush=True)
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.group_size))
    print()
    print(seed_table(results, args.group_size))


if __name__ == "__main__":
    main()
