#!/usr/bin/env bash
# Deployment figures for the embedded SmolLM2-135M (issue 5's table): the formats lowbit writes, their size on disk
# and in memory, prefill / decode speed against fp32 and bf16 in one run. Every export's logits agreement with
# lowbit's own loader, and llama.cpp's speed on the GGUF files, are bench/exports.sh's.
# Reuses the models bench/methods.sh wrote to out/bench/methods (quantizing any that are missing). Writes
# bench/results/runtime/. Run it on an otherwise idle machine: the speeds are only comparable within one run.
#   usage: bench/runtime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
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
quantize gptq-w4g32-sym bench/recipes/gptq-w4g32-sym.json
# the formats a user picks between, on the fast backend (the exact one's per-call dequantization is measured in
# the table above: 10-50x slower decoding); 16 new tokens, median of 3
$LOWBIT bench "$MODELS/w8" "$MODELS/w4g128" "$MODELS/gptq-w4g32-sym" "$MODELS/smoothquant-w8a8" "$MODELS/llm-int8" \
  "$MODELS/wanda-2of4" --backends fast --new-tokens 16 --repeats 3 --results "$RESULTS"
