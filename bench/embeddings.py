"""The whole model smaller: W4 g128 (RTN) with the embedding and head left in float, against the same recipe with
them on INT8 and on INT6 (asymmetric, groups of 128 along the hidden size: the `-e8` / `-e6` presets), on the
embedded SmolLM2-135M (49,152-token vocabulary, tied head) and two real models with large vocabularies and tied
heads: Gemma 3 270M (262,144 tokens) and Qwen2.5-Coder 0.5B (151,936 tokens), as GGUF files (their float32 import
is the reference size). Perplexity: SmolLM2 on 16 windows of 2048 tokens (the README's protocol), the others on 8
windows of 512 (docs/real_models.md's). Writes bench/results/embeddings.json and prints a table.

    bench/real_models.sh is the source of the two GGUF files:  FETCH_ONLY=1 bench/real_models.sh
    .venv/bin/python bench/embeddings.py [--models smollm2-135m gemma3-270m qwen2.5-coder-0.5b]     (~15 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "embeddings.json"
WORK = ROOT / "out" / "bench" / "embeddings"
REAL = ROOT / "out" / "realmodels"
os.environ.setdefault("LOWBIT_CACHE", str(REAL / "cache"))  # the float32 import bench/real_models.sh made, reused
# name -> (model spec, evaluation windows, window)
MODELS = {
    "smollm2-135m": ("smollm2-135m", 16, 2048),
    "gemma3-270m": (str(REAL / "gemma-3-270m-q4_k_m.gguf"), 8, 512),
    "qwen2.5-coder-0.5b": (str(REAL / "qwen2.5-coder-0.5b-instruct.gguf"), 8, 512),
}
RECIPES = ("w4g128", "w4g128-e8", "w4g128-e6")


def lowbit(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "--quiet", *argv, "--json"],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    from lowbit.models.checkpoint import CheckpointReader
    from lowbit.models.source import resolve_model

    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        spec, windows, window = MODELS[name]
        if not spec.startswith("smollm2") and not Path(spec).is_file():
            print(f"{name}: {spec} is missing; run FETCH_ONLY=1 bench/real_models.sh first", file=sys.stderr)
            return 1
        float_bytes = CheckpointReader(resolve_model(spec).folder).nbytes()
        evaluation = ["--max-windows", str(windows), "--window", str(window)]
        base = lowbit("eval", spec, *evaluation)
        rows.append({"model": name, "recipe": "float32", "bytes": float_bytes, "vs_float32": 1.0,
                     "perplexity": base["perplexity"]})
        for recipe in RECIPES:
            out = WORK / f"{name}-{recipe}"
            summary = lowbit("quantize", "--model", spec, "--recipe", recipe, "--out", str(out), "--overwrite")
            result = lowbit("eval", str(out), *evaluation)
            rows.append({"model": name, "recipe": recipe, "bytes": summary["out_bytes"],
                         "vs_float32": summary["out_bytes"] / float_bytes, "perplexity": result["perplexity"]})
        plain = next(r for r in rows if r["model"] == name and r["recipe"] == "w4g128")
        for row in rows:
            if row["model"] == name:
                row["perplexity_vs_w4g128"] = row["perplexity"] / plain["perplexity"] - 1
                print(f"{name:20s} {row['recipe']:10s} {row['bytes'] / 2**20:9.1f} MiB  {row['vs_float32']:.3f}x fp32  "
                      f"ppl {row['perplexity']:.4f} ({row['perplexity_vs_w4g128']:+.2%} vs w4g128)", flush=True)
    from lowbit.evaluation.speed import machine_description

    RESULTS.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
