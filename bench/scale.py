"""How quantization cost grows with the model: wall time, time per block, where the time goes (phases) and peak
resident memory (overall and per phase), for RTN and GPTQ W4 g128 on real models of growing size.

Each run is a fresh `lowbit quantize --json` process (RTN data-free, as users run it: no calibration pass) (its phase seconds and per-phase peaks come from the run's own
report; wall time is the whole process here). Models: the embedded SmolLM2-135M, and the real GGUF files
bench/real_models.sh fetches and checks (`FETCH_ONLY=1 bench/real_models.sh`): Gemma 3 270M and Qwen2.5-Coder 0.5B.
Every model is imported to float32 once before timing (LOWBIT_GGUF_DTYPE=float32, cache out/realmodels/cache).
Writes bench/results/scale.json and prints a Markdown table.

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale.py [--models ...] [--recipes w4g128 gptq-w4g128]
        [--nsamples 16 --seq-len 512]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"
WORK = ROOT / "out" / "bench" / "scale"
REAL = ROOT / "out" / "realmodels"
MODELS = {
    "smollm2-135m": "smollm2-135m",
    "gemma3-270m": str(REAL / "gemma-3-270m-q4_k_m.gguf"),
    "qwen2.5-coder-0.5b": str(REAL / "qwen2.5-coder-0.5b-instruct.gguf"),
}
ENV = {**os.environ, "LOWBIT_GGUF_DTYPE": "float32", "LOWBIT_CACHE": str(REAL / "cache")}


def prepare(model: str) -> dict:
    """Import the model once (not timed) and describe it: parameters, hidden size, blocks, float32 bytes."""
    code = (
        "import json, sys; from lowbit.models.source import resolve_model; from lowbit.models.checkpoint import "
        "CheckpointReader; from transformers import AutoConfig; s = resolve_model(sys.argv[1]); "
        "c = AutoConfig.from_pretrained(s.folder); r = CheckpointReader(s.folder); "
        "print(json.dumps({'hidden_size': c.hidden_size, 'blocks': c.num_hidden_layers, 'bytes': r.nbytes()}))"
    )
    done = subprocess.run([sys.executable, "-c", code, model], env=ENV, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantize(model: str, recipe: str, out: Path, nsamples: int, seq_len: int) -> dict:
    command = [sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--model", model, "--recipe", recipe,
               "--nsamples", str(nsamples), "--seq-len", str(seq_len), "--out", str(out), "--overwrite", "--json"]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scale: {recipe} on {model} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(done.stdout)
    return {"command": " ".join(command[2:]), "wall_seconds": round(wall, 1), **{
        k: summary[k] for k in ("seconds", "phase_seconds", "peak_rss_bytes", "peak_rss_after_phase", "source_bytes",
                                "out_bytes", "mean_linear_error")}}


def machine() -> dict:
    from lowbit.evaluation.speed import machine_description

    return machine_description("cpu")


def table(rows: list[dict]) -> str:
    lines = [
        "| model | recipe | hidden x blocks | fp32 checkpoint | wall | per block | peak RSS | peak / (fp32 + activations) "
        "| statistics / compress / final pass / capture |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p = r["phase_seconds"]
        acts = r["activation_bytes"]
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['hidden_size']} x {r['blocks']} | {r['source_bytes'] / 2**20:,.0f} MiB "
            f"| {r['wall_seconds']:.0f} s | {r['seconds'] / r['blocks']:.2f} s | {r['peak_rss_bytes'] / 2**20:,.0f} MiB "
            f"| {r['peak_rss_bytes'] / (r['source_bytes'] + acts):.2f} "
            f"| {p.get('statistics passes', 0):.0f} / {p.get('compress', 0):.0f} / {p.get('final pass', 0):.0f} / "
            f"{p.get('capture', 0):.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=["w4g128", "gptq-w4g128"])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    for name in args.models:
        model = MODELS[name]
        if model.endswith(".gguf") and not Path(model).exists():
            raise SystemExit(f"scale: {model} is missing; fetch it with FETCH_ONLY=1 bench/real_models.sh")
        info = prepare(model)
        for recipe in args.recipes:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {name} {recipe}", flush=True)
            run = quantize(model, recipe, WORK / f"{name}-{recipe}", args.nsamples, args.seq_len)
            row = {
                "model": name, "recipe": recipe, "nsamples": args.nsamples, "seq_len": args.seq_len,
                "hidden_size": info["hidden_size"], "blocks": info["blocks"],
                # block-0 inputs kept for the whole run: [N, L, hidden] float32
                "activation_bytes": args.nsamples * args.seq_len * info["hidden_size"] * 4,
                "date": f"{datetime.date.today()}", "machine": machine(), **run,
            }
            results["rows"] = [r for r in results["rows"] if (r["model"], r["recipe"]) != (name, recipe)] + [row]
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    print(table(results["rows"]))


if __name__ == "__main__":
    main()
