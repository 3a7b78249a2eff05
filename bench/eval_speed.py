"""Evaluation speed of lowbit outputs against the float model they came from: perplexity tokens/s of `evaluate`
(what `lowbit eval` and `compare` run) on the exact backend (dequantizes every weight in every forward) and the
dequantized backend (each weight dequantized once at load; evaluation's default), each in a fresh process, median
of ``--repeats`` rounds (each round runs every configuration once). The two backends must give the same perplexity to the last digit (their logits are
bit-identical; tests/test_fast_backend.py checks the logits themselves).

Models (the two cases the issue names):
  * the embedded SmolLM2-135M, 2048-token windows (the float embedding head is a large share of the work);
  * a random Llama of hidden size 768 (4 blocks, MLP 2048, 512-token vocabulary), 256-token windows, where the
    Linears are the work. Written once to out/bench/eval_speed/.
Outputs: RTN w8 and w4g128 of each on both backends, and the outputs that quantize their inputs in every forward
(W8A8 INT8 dynamic and static, W4A8, W4A8 with QuaRot's online rotation, FP8 dynamic and static, MXFP4 and NVFP4
W4A4, LLM.int8()) on the dequantized backend, evaluation's default. The static ones are calibrated on 8 x 256
tokens (their speed does not depend on it). Writes bench/results/eval_speed.json and prints a table.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_speed.py [--repeats 3] [--tokens 8192] [--recipes ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "eval_speed.json"
WORK = ROOT / "out" / "bench" / "eval_speed"
CHILD = r"""
import json, sys, torch
from lowbit.evaluation.evaluate import evaluate
spec, window, windows, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
summary = evaluate(spec, "wiki", window, windows, backend=backend).summary()
print(json.dumps({"perplexity": summary["perplexity"], "tokens_per_second": summary["eval_tokens_per_second"]}))
"""


def random_llama(folder: Path) -> Path:
    """The random Llama (hidden 768), with a byte-level tokenizer whose 256 ids fit its 512-token vocabulary."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins ByteLevel maps bytes to
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer, core.decoder = byte_level, decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(folder)
    return folder


WEIGHT_ONLY = ("w8", "w4g128")  # measured on both backends
INPUT_QUANTIZING = ("w8a8-token", "w8a8-naive", "w4a8", "quarot-w4a8", "fp8-dynamic", "fp8", "mxfp4", "nvfp4",
                    "llm-int8")


def lowbit(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "lowbit.cli.main", "--quiet", *argv], check=True, stdout=subprocess.DEVNULL)


def output(label: str, spec: str, recipe: str) -> Path:
    """The lowbit output of model ``spec`` under ``recipe`` in WORK, quantized once (the static grids calibrated on
    8 x 256 tokens: the speed measured does not depend on it)."""
    out = WORK / f"{label.replace(' ', '-')}-{recipe}"
    if not (out / "lowbit_config.json").exists():
        lowbit("quantize", "--model", spec, "--recipe", recipe, "--out", str(out), "--overwrite",
               "--nsamples", "8", "--seq-len", "256")
    return out


def measure_all(configs: dict[str, tuple[str, int, int, str]], repeats: int) -> dict[str, dict]:
    """Each config (spec, window, windows, backend) once per round, ``repeats`` rounds: a drift in the machine's
    speed spreads over every config instead of landing on one."""
    runs: dict[str, list[dict]] = {key: [] for key in configs}
    for _ in range(repeats):
        for key, (spec, window, windows, backend) in configs.items():
            done = subprocess.run([sys.executable, "-c", CHILD, spec, str(window), str(windows), backend],
                                  stdout=subprocess.PIPE, text=True, check=True)
            runs[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: {"perplexity": r[0]["perplexity"], "same_perplexity_every_run": len({x["perplexity"] for x in r}) == 1,
                  "tokens_per_second": statistics.median(x["tokens_per_second"] for x in r), "runs": r}
            for key, r in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens per run (windows x window)")
    parser.add_argument("--recipes", nargs="+", default=[*WEIGHT_ONLY, *INPUT_QUANTIZING],
                        help=f"outputs to measure (weight-only ones, {', '.join(WEIGHT_ONLY)}, on both backends)")
    args = parser.parse_args()
    from lowbit.errors import LowbitError
    from lowbit.presets import resolve_recipe

    for recipe in args.recipes:  # before any model is built: one line, not a child's traceback
        try:
            resolve_recipe(recipe)
        except LowbitError as error:
            parser.error(str(error))
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"smollm2-135m": ("smollm2-135m", 2048), "random llama h768": (str(random_llama(WORK / "llama-h768")), 256)}
    rows = []
    for label, (spec, window) in models.items():
        windows = max(1, args.tokens // window)
        configs = {("float32", "-"): (spec, window, windows, "exact")}
        for recipe in args.recipes:
            out = output(label, spec, recipe)
            for backend in ("exact", "dequantized") if recipe in WEIGHT_ONLY else ("dequantized",):
                configs[(recipe, backend)] = (str(out), window, windows, backend)
        measured = measure_all(configs, args.repeats)
        base = measured[("float32", "-")]["tokens_per_second"]
        for (recipe, backend), m in measured.items():
            exact = measured.get((recipe, "exact"))  # the input-quantizing rows: tests/test_fast_backend.py
            same = None if exact is None or recipe == "float32" else m["perplexity"] == exact["perplexity"]
            rows.append({"model": label, "recipe": recipe, "backend": backend, "windows": windows, "window": window,
                         **m, "vs_float": m["tokens_per_second"] / base, "same_perplexity_as_exact": same})
            print(f"{label:18s} {recipe:12s} {backend:12s} {m['tokens_per_second']:8.1f} tok/s  ppl {m['perplexity']}  "
                  f"{m['tokens_per_second'] / base:.2f}x float" + ("" if same is None else f"  same ppl as exact: {same}"),
                  flush=True)
    from lowbit.evaluation.speed import machine_description

    RESULTS.write_text(json.dumps({"machine": machine_description(), "tokens": args.tokens, "recipes": args.recipes,
                                   "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
