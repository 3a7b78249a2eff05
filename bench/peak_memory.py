"""Peak resident memory of `lowbit quantize` against the size of the model it quantizes.

lowbit never loads a model whole: the skeleton lives on the meta device and each decoder block is read from disk
when its turn comes. This benchmark measures what that buys. Each run is a fresh `lowbit quantize --json`
process, which reports its own peak RSS (getrusage ru_maxrss). Three figures per model:
  * the floor: a process that only imports lowbit, torch and transformers;
  * RTN W4 g128 (and, on the real model, GPTQ W4 g128) quantization of the model;
  * the model's float32 checkpoint size, the memory a whole-model tool would need at least.
Models: the embedded SmolLM2-135M (real weights), and a randomly initialised Llama of about 1.1B parameters
(``--synthetic``; TinyLlama's shape) written to disk once, which shows that peak memory follows one block, not the
model. Writes bench/results/peak_memory.json and prints a Markdown table.

    .venv/bin/python bench/peak_memory.py [--synthetic] [--nsamples 32 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "peak_memory.json"
WORK = ROOT / "out" / "bench" / "memory"
FLOOR = "import torch, transformers, lowbit.api; from lowbit.cli.common import peak_rss_bytes; print(peak_rss_bytes())"


def lowbit(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "--quiet", *argv], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout)


def synthetic_llama(folder: Path, tokenizer_source: Path) -> Path:
    """A random ~1.1B-parameter Llama (TinyLlama's shape, SmolLM2's tokenizer), saved once as safetensors shards."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return folder


def measure(model: str, label: str, calibration: list[str], recipes: tuple[str, ...]) -> dict:
    rows = {}
    for recipe in recipes:
        summary = lowbit("quantize", "--model", model, "--recipe", recipe, "--out", str(WORK / f"{label}-{recipe}"),
                         "--overwrite", "--json", *calibration)
        rows[recipe] = {"peak_rss_bytes": summary["peak_rss_bytes"], "seconds": summary["seconds"]}
        fp32_bytes = summary["source_bytes"]
    return {"model": label, "calibration": " x ".join(calibration[1::2]) + " tokens", "fp32_checkpoint_bytes": fp32_bytes,
            "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="also measure a random 1.1B-parameter Llama")
    parser.add_argument("--nsamples", default="32")
    parser.add_argument("--synthetic-nsamples", default="8", help="calibration sequences for the 1.1B model")
    parser.add_argument("--seq-len", default="512")
    args = parser.parse_args()
    calibration = ["--nsamples", args.nsamples, "--seq-len", args.seq_len]
    WORK.mkdir(parents=True, exist_ok=True)
    floor = int(subprocess.run([sys.executable, "-c", FLOOR], stdout=subprocess.PIPE, text=True, check=True).stdout)
    models = [measure("smollm2-135m", "smollm2-135m", calibration, ("w4g128", "gptq-w4g128"))]
    if args.synthetic:
        from lowbit.models.source import resolve_model

        folder = synthetic_llama(WORK / "synthetic-llama-1.1b", resolve_model("smollm2-135m").folder)
        # RTN on 8 sequences only: on 2 CPU cores every pass over a 1.1B model is slow, and the point is that the
        # weights are never resident whole; GPTQ's Hessians are measured on the real model above
        small = ["--nsamples", args.synthetic_nsamples, "--seq-len", args.seq_len]
        models.append(measure(str(folder), "random llama 1.1B", small, ("w4g128",)))
    results = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "import_floor_bytes": floor,
        "models": models,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    mib = 2**20
    print(f"a process importing lowbit, torch and transformers alone: {floor / mib:,.0f} MiB\n")
    print("| model | fp32 checkpoint | calibration | recipe | quantize peak RSS | peak / fp32 | peak above import floor |")
    print("|---|---:|---|---|---:|---:|---:|")
    for m in models:
        for recipe, run in m["runs"].items():
            peak, fp32 = run["peak_rss_bytes"], m["fp32_checkpoint_bytes"]
            print(f"| {m['model']} | {fp32 / mib:,.0f} MiB | {m['calibration']} | {recipe} | {peak / mib:,.0f} MiB | "
                  f"{peak / fp32:.0%} | {(peak - floor) / mib:,.0f} MiB |")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
