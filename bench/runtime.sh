#!/usr/bin/env bash
# Deployment figures for the embedded SmolLM2-135M (issue 5's table): the formats lowbit writes, their size on disk
# and in memory, prefill / decode speed against fp32 and bf16 in one run, and the GGUF export's logits agreement.
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
.venv/bin/python bench/export_agreement.py "$MODELS/gptq-w4g32-sym" "$MODELS/gptq-w4g32-sym/model.gguf" \
  --results "$RESULTS/gguf_agreement.json"
$LOWBIT bench "$MODELS/w8" "$MODELS/w4g128" "$MODELS/gptq-w4g32-sym" "$MODELS/smoothquant-w8a8" "$MODELS/llm-int8" \
  "$MODELS/wanda-2of4" --results "$RESULTS"
