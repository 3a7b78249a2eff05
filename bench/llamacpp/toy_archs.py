"""Does llama.cpp compute what lowbit computes, for every architecture lowbit's GGUF export writes, including those
with no pretrained weights reachable here (Qwen3, Phi-3)?

For each of llama, mistral, qwen2, qwen3, gemma3_text and phi3: a small random model (hidden 256, so its Linears,
embedding and head hold K blocks; weights drawn wide enough that its next-token distributions are far from uniform,
so a mis-built graph shows; Gemma's embedding is tied, the others' are not), SmolLM2's tokenizer, quantized by each
of --recipes (default: every llama.cpp K mix), saved, exported to GGUF; then
`llama-perplexity -c CTX --chunks K`
on lowbit's evaluation text, and lowbit's own perplexity of the same model computed as llama-perplexity computes it
(the text tokenized whole with BOS, cut in chunks of CTX tokens, each chunk's first token BOS, the second half of
each chunk scored). The two agree to llama.cpp's arithmetic (it quantizes activations to 8 bits in its quantized
matmuls) when the file is read as lowbit means it; a wrong tensor layout, norm or rope would not: the control row is
the Gemma 3 file written with its norms' +1 left out.

    bench/llamacpp/tools.sh   (once)
    .venv/bin/python bench/llamacpp/toy_archs.py [--ctx 128] [--chunks 8] [--recipes gptq-q4_k_m q6_k ...]

Writes bench/results/llamacpp/toy_archs.json and prints a Markdown table (llama.cpp's perplexity over lowbit's, per
architecture and recipe). Work files go to out/llamacpp/toy_archs/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "out" / "llamacpp" / "tools" / "bin"
WORK = REPO / "out" / "llamacpp" / "toy_archs"
RESULTS = REPO / "bench" / "results" / "llamacpp"
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
RUNNING = re.compile(r"\[\d+\]([0-9.]+),")  # the estimate after each chunk
# every llama.cpp mix lowbit writes (Q2_K_S only with an importance, as llama-quantize); between them they hold every
# K type, Q2_K .. Q6_K (the head is Q6_K in each)
RECIPES = ("gptq-q4_k_m", "q2_k_m", "imatrix-q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q5_k_m")


def configs(vocab: int, special: dict) -> dict:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, **special)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common, sliding_window=None),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common, head_dim=64),
        # llama.cpp's query scale is 1/sqrt(head_dim): Gemma 3's query_pre_attn_scalar equals head_dim here
        "gemma3_text": Gemma3TextConfig(**common, head_dim=256, sliding_window=64),
        "phi3": Phi3Config(**common),
    }


def lowbit_perplexity(model, ids: list[int], bos: int | None, ctx: int, chunks: int) -> float:  # noqa: ANN001
    """llama-perplexity's estimate, computed with lowbit's model: chunks of ``ctx`` tokens, the first set to BOS,
    the last ctx/2 - 1 predictions of each scored."""
    import torch

    total, count = 0.0, 0
    for j in range(chunks):
        chunk = torch.tensor(ids[j * ctx : (j + 1) * ctx]).unsqueeze(0)
        if bos is not None:
            chunk[0, 0] = bos
        with torch.no_grad():
            logits = model(chunk).logits.float()[0]
        first = ctx // 2
        logp = torch.log_softmax(logits[first : ctx - 1], dim=-1)
        total -= logp.gather(1, chunk[0, first + 1 : ctx].unsqueeze(1)).sum().item()
        count += ctx - 1 - first
    return math.exp(total / count)


def llama_perplexity(path: Path, ctx: int, chunks: int) -> float | None:
    """llama-perplexity's final estimate for GGUF ``path`` (None when llama.cpp cannot run it; its log beside it)."""
    log = path.with_suffix(".log")
    with log.open("w") as sink:
        subprocess.run([str(BIN / "llama-perplexity"), "-m", str(path), "-f", str(WORK / "evaluation.txt"), "-c",
                        str(ctx), "--chunks", str(chunks), "-t", "2"], stdout=sink, stderr=subprocess.STDOUT, check=False)
    output = log.read_text(errors="replace")
    found = FINAL.search(output)
    if found is None:  # a uniform prediction has no spread, and llama-perplexity then prints no final line
        found = (RUNNING.findall(output) or [None])[-1]
        return float(found) if found else None
    return float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = parser.parse_args()
    if not (BIN / "llama-perplexity").is_file():
        sys.exit(f"{BIN / 'llama-perplexity'} is missing: run bench/llamacpp/tools.sh first")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit.data.calibration import calibration_ids
    from lowbit.data.text import DEFAULT_TEXT, documents
    from lowbit.export.gguf import write_gguf
    from lowbit.models.source import resolve_model
    from lowbit.presets import resolve_recipe

    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").folder)
    text = "\n\n".join(documents(DEFAULT_TEXT, "evaluation"))[: 6 * args.ctx * args.chunks]
    (WORK / "evaluation.txt").write_text(text)
    bos = tokenizer.bos_token_id
    ids = ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    special = {"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}
    calibration = calibration_ids(tokenizer, documents(DEFAULT_TEXT, "calibration"), 8, 128, seed=0)
    rows = []
    for name, config in configs(len(tokenizer), special).items():
        torch.manual_seed(0)
        source = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # wide weights: peaked next-token distributions, so a mis-built graph shows
            for param in source.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 2.0 / math.sqrt(param.shape[1]))
        for recipe in args.recipes:
            model = lowbit.quantize(copy.deepcopy(source), resolve_recipe(recipe), calibration, batch_size=4)
            # the folder's name is the file's general.name, which llama.cpp matches against "phi3" to set the Phi-3
            # tokenizer's token attributes: SmolLM2's vocabulary lacks those tokens
            folder = WORK / "toy"
            lowbit.save(model, folder, tokenizer=tokenizer, overwrite=True)
            loaded = lowbit.load(folder)
            path = WORK / f"{name}-{recipe}.gguf"
            types = write_gguf(folder, loaded, path, overwrite=True)
            ours = lowbit_perplexity(loaded, ids, bos, args.ctx, args.chunks)
            theirs = llama_perplexity(path, args.ctx, args.chunks)
            tied = "tied" if source.config.tie_word_embeddings else "F32"
            outside = [types.get("model.embed_tokens", "F32"), types.get("lm_head", tied)]
            rows.append({"architecture": name, "recipe": recipe, "lowbit": round(ours, 4), "llama.cpp": theirs,
                         "ratio": float(f"{theirs / ours:.4g}") if theirs else None,
                         "types": sorted(set(types.values())), "embedding, head": outside})
            print(rows[-1], flush=True)
            path.unlink()  # 9 recipes x 6 architectures of 30-60 MB files
            if name == "gemma3_text" and recipe == args.recipes[0]:  # the control: Gemma's norm offset left out
                import lowbit.export.gguf_arch as gguf_arch

                right = gguf_arch.GGUF_ARCHITECTURES[name]
                gguf_arch.GGUF_ARCHITECTURES[name] = dataclasses.replace(right, norm_offset=0.0)
                write_gguf(folder, loaded, WORK / "control.gguf", overwrite=True)
                gguf_arch.GGUF_ARCHITECTURES[name] = right
                wrong = llama_perplexity(WORK / "control.gguf", args.ctx, args.chunks)
                rows.append({"architecture": "gemma3_text, norms without the +1 (a wrong file)", "recipe": recipe,
                             "lowbit": round(ours, 4), "llama.cpp": wrong,
                             "ratio": float(f"{wrong / ours:.4g}") if wrong else None})
                print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"ctx": args.ctx, "chunks": args.chunks, "rows": rows,
              "command": "bench/llamacpp/toy_archs.py " + " ".join(sys.argv[1:])}
    (RESULTS / "toy_archs.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\nllama.cpp's perplexity of each GGUF over lowbit's own of the same model:\n")
    archs = list(dict.fromkeys(r["architecture"] for r in rows if "recipe" in r and "wrong" not in r["architecture"]))
    print("| recipe | " + " | ".join(archs) + " |\n|---|" + "---:|" * len(archs))
    for recipe in args.recipes:
        ratio = {r["architecture"]: r["ratio"] for r in rows if r["recipe"] == recipe}
        print(f"| {recipe} | " + " | ".join(str(ratio.get(a)) for a in archs) + " |")
    for r in rows:
        if "wrong" in r["architecture"]:
            print(f"\ncontrol, {r['architecture']} ({r['recipe']}): llama.cpp {r['llama.cpp']}, lowbit {r['lowbit']}, "
                  f"ratio {r['ratio']}")
    ratios = [r["ratio"] for r in rows if "wrong" not in r["architecture"] and r["ratio"] is not None]
    missing = [f"{r['architecture']} {r['recipe']}" for r in rows if r["ratio"] is None]
    print(f"\n{len(ratios)} files read by llama.cpp, ratio {min(ratios):.3f} .. {max(ratios):.3f}"
          + (f"; not run by llama.cpp: {', '.join(missing)}" if missing else ""))

if __name__ == "__main__":
    main()
