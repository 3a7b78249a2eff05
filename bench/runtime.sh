#!/usr/bin/env bash
# Deployment figures for the embedded SmolLM2-135M (issue 5's table): the formats lowbit writes, their size on disk
# and in memory, prefill / decode speed against fp32 and bf16 in one run, and every export's logits agreement
# with lowbit's own loader.
# Reuses the models bench/methods.sh wrote to out/bench/methods (quantizing any that are missing). Writes
# bench/results/runtime/. Run it on an otherwise idle machine: the speeds are only comparable within one run.
#   usage: bench/runtime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=.venv/bin/lowbit
MODELS=out/bench/methods
RESULTS=bench/results/runtime
mkdir -p "$RESULTS"
quantize() {  # name, recipe (preset or file), extra options
  local name=$1 recipe=$2; shift 2
  if [ ! -f "$MODELS/$name/lowbit_config.json" ]; then
    $LOWBIT quantize --recipe "$recipe" --nsamples 64 --seq-len 512 --out "$MODELS/$name" --overwrite "$@"
  fi
}
quantize w8 w8
quantize w4g128 w4g128
quantize smoothquant-w8a8 smoothquant-w8a8
quantize llm-int8 llm-int8
quantize wanda-2of4 wanda-2of4
quantize gptq-w4g32-sym bench/recipes/gptq-w4g32-sym.json --format gguf
# every export against lowbit's own loader on the same held-out windows: GGUF Q4_0 (llama.cpp), compressed-tensors
# pack-quantized (the symmetric W4 g32 model) and int-quantized (SmoothQuant W8A8), both as transformers loads them
$LOWBIT export "$MODELS/gptq-w4g32-sym" --format compressed-tensors --out "$MODELS/gptq-w4g32-sym-ct" --overwrite
$LOWBIT export "$MODELS/smoothquant-w8a8" --format compressed-tensors --out "$MODELS/smoothquant-w8a8-ct" --overwrite
agreement() {  # lowbit folder, export, result name
  .venv/bin/python bench/export_agreement.py "$1" "$2" --results "$RESULTS/$3.json"
}
agreement "$MODELS/gptq-w4g32-sym" "$MODELS/gptq-w4g32-sym/model.gguf" gguf_q4_0_agreement
agreement "$MODELS/gptq-w4g32-sym" "$MODELS/gptq-w4g32-sym-ct" ct_pack_quantized_agreement
agreement "$MODELS/smoothquant-w8a8" "$MODELS/smoothquant-w8a8-ct" ct_int_quantized_agreement
# the formats a user picks between, on the fast backend (the exact one's per-call dequantization is measured in
# the table above: 10-50x slower decoding); 16 new tokens, median of 3
$LOWBIT bench "$MODELS/w8" "$MODELS/w4g128" "$MODELS/gptq-w4g32-sym" "$MODELS/smoothquant-w8a8" "$MODELS/llm-int8" \
  "$MODELS/wanda-2of4" --backends fast --new-tokens 16 --repeats 3 --results "$RESULTS"
