"""Print the export agreement table (README "Exports against lowbit's own loader") from bench/exports.sh's results.

    .venv/bin/python bench/exports_table.py bench/results/exports
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# result file stem -> (export, what it holds)
ROWS = {
    "embedded_q4_1_llamacpp": ("embedded GGUF Q4_1 (baseline: the engine itself)", "SmolLM2's own file vs lowbit's fp32 conversion"),
    "w8g32-sym_gguf_llamacpp": ("GGUF Q8_0", "RTN W8 sym g32"),
    "w8g32-sym_gguf_transformers": ("GGUF Q8_0", "RTN W8 sym g32"),
    "gptq-w4g32-sym_gguf_llamacpp": ("GGUF Q4_0", "GPTQ W4 sym g32"),
    "gptq-w4g32-sym_gguf_transformers": ("GGUF Q4_0", "GPTQ W4 sym g32"),
    "gptq-w4g32_gguf_llamacpp": ("GGUF Q4_1", "GPTQ W4 asym g32"),
    "gptq-w4g32_gguf_transformers": ("GGUF Q4_1", "GPTQ W4 asym g32"),
    "gptq-w4g32-sym_ct_transformers": ("compressed-tensors pack-quantized", "GPTQ W4 sym g32"),
    "smoothquant-w8a8_ct_transformers": ("compressed-tensors int-quantized", "SmoothQuant W8A8"),
    "wanda-2of4_ct_transformers": ("compressed-tensors, pruned Linears dense", "Wanda 2:4"),
}


def main() -> None:
    folder = Path(sys.argv[1])
    print("| export | model | read by | bytes | max logit diff / max logit | top-1 agreement | perplexity lowbit / export | tokenization |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for stem, (export, model) in ROWS.items():
        path = folder / f"{stem}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        reader = "llama.cpp" if r["reader"] == "llama.cpp" else ("transformers `gguf_file=`" if "GGUF" in export else "transformers + compressed-tensors")
        relative = "0 (identical)" if r["max_abs_logit_diff"] == 0 else f"{r['relative']:.4f}"
        if "tokenization_identical" in r:
            tokens = "identical" if r["tokenization_identical"] else f"differs ({r['tokens_llamacpp']:,} vs {r['tokens_hf']:,} tokens)"
        else:
            tokens = "(same ids given)"
        print(f"| {export} | {model} | {reader} | {r['exported_bytes'] / 2**20:,.1f} MiB | {relative} | "
              f"{r['top1_agreement']:.1%} | {r['perplexity_lowbit']:.3f} / {r['perplexity_exported']:.3f} | {tokens} |")


if __name__ == "__main__":
    main()
