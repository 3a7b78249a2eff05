"""Where AWQ's clip search costs perplexity: one AWQ run with the clip search (its scales and clips saved in the
output's transforms.safetensors), then the same scales and clips re-applied with the clips of chosen Linears removed
(set to +inf: nothing clamped), so each variant differs from the base only in those clips. Each output is evaluated
by bench/peers/evaluate.py on the model's shared evaluation windows. Prints one JSON line per variant and writes
bench/results/peers/awq_clip-<model>-g<G>-seed<S>-t<T>-sink<P>.json (rows of earlier runs of other variants kept).

  usage: .venv/bin/python bench/peers/awq_clip.py --model M --seed S [--group-size 128] [--clip-tokens 512]
         [--variants NAME ...] [--sink-positions 1]
         (after bench/peers/prepare.py --model M --seeds S; the base run takes AWQ's full time, each variant a
         quantize pass without the searches)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from run import evaluate
from shared import REPO, WORK, ids_file, model_folder, model_name

LOWBIT = REPO / ".venv" / "bin" / "lowbit"
# variant name -> the Linears whose clips it removes (regular expressions on the tensor names)
VARIANTS = {
    "clip everywhere": [],
    "no clip on down_proj": [r"\.down_proj\."],
    "no clip on gate_proj, up_proj": [r"\.gate_proj\.", r"\.up_proj\."],
    "no clip on v_proj, o_proj": [r"\.v_proj\.", r"\.o_proj\."],
    "no clip anywhere": [r"."],
    # Qwen2.5-Coder 0.5B's block 3 down_proj writes the attention sinks' massive activation (docs/peers.md): run only
    # when named, since on another model that block means nothing
    "no clip on block 3's down_proj": [r"\.layers\.3\.mlp\.down_proj\."],
}
MODEL_SPECIFIC = {"no clip on block 3's down_proj"}


def without_clips(artifact: Path, patterns: list[str], out: Path) -> int:
    """A copy of an AWQ artifact whose clips matching any pattern clamp nothing; returns how many were removed."""
    tensors = load_file(str(artifact))
    removed = [k for k in tensors if k.endswith(".awq_clip") and any(re.search(p, k) for p in patterns)]
    for key in removed:
        tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(out))
    return len(removed)


def quantize(recipe: dict, folder: Path, name: str, seed: int) -> None:
    recipe_file = folder.with_suffix(".json")
    recipe_file.write_text(json.dumps(recipe, indent=1))
    if not (folder / "lowbit_config.json").is_file():
        done = subprocess.run([str(LOWBIT), "quantize", "--model", str(model_folder(name)), "--recipe",
                               str(recipe_file), "--nsamples", "16", "--seq-len", "512", "--seed", str(seed), "--out",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:  # lowbit's own one-line error (a missing model folder: run prepare.py first)
            raise SystemExit(f"awq_clip: {done.stderr.strip()[-300:]}")


def perplexity(folder: Path, name: str, seed: int) -> float:
    evaluated = evaluate("lowbit", folder, ids_file(name, seed))
    if "error" in evaluated:
        raise SystemExit(f"awq_clip: evaluating {folder} failed: {evaluated['error']}")
    return evaluated["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--clip-tokens", type=int, default=512, help="tokens the clip search samples (AWQ's default)")
    parser.add_argument("--sink-positions", type=int, default=1, help="AWQ's clip_sink_positions (0: AutoAWQ's "
                        "random sample alone, lowbit's before stop 43)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=[v for v in VARIANTS if v not in MODEL_SPECIFIC])
    args = parser.parse_args()
    name = model_name(args.model)
    if not (model_folder(name) / "config.json").is_file() or not ids_file(name, args.seed).is_file():
        raise SystemExit(f"awq_clip: {name}'s shared inputs for seed {args.seed} are missing; run "
                         f"bench/peers/prepare.py --model {args.model} --seeds {args.seed} first")
    tag = f"g{args.group_size}-seed{args.seed}-t{args.clip_tokens}-sink{args.sink_positions}"
    work = WORK / name / f"awq_clip-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    preset = json.loads(subprocess.run([str(LOWBIT), "recipes", f"awq-w4g{args.group_size}"], check=True,
                                       capture_output=True, text=True).stdout)
    preset["steps"][0]["clip_tokens"] = args.clip_tokens
    preset["steps"][0]["clip_sink_positions"] = args.sink_positions
    base = work / "base"
    quantize(preset, base, name, args.seed)
    out = REPO / "bench" / "results" / "peers" / f"awq_clip-{name}-{tag}.json"
    results = json.loads(out.read_text())["rows"] if out.is_file() else []  # other variants' rows are kept
    for variant in args.variants:
        patterns = VARIANTS[variant]
        folder = base if not patterns else work / re.sub(r"\W+", "-", variant).strip("-")
        removed = 0
        if patterns:
            recipe = json.loads(json.dumps(preset))
            artifact = folder.with_suffix(".safetensors")
            removed = without_clips(base / "transforms.safetensors", patterns, artifact)
            recipe["steps"][0]["artifact"] = str(artifact)
            quantize(recipe, folder, name, args.seed)
        row = {"variant": variant, "clips_removed": removed, "perplexity": perplexity(folder, name, args.seed)}
        print(json.dumps(row), flush=True)
        results = [r for r in results if r["variant"] != variant] + [row]
    out.write_text(json.dumps({"model": name, "seed": args.seed, "group_size": args.group_size,
                               "clip_tokens": args.clip_tokens,
                               "clip_sink_positions": args.sink_positions, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
