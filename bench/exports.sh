#!/usr/bin/env bash
# Every export lowbit writes, read back by the software that serves it, against lowbit's own loader on the same
# held-out windows of the embedded evaluation text (bench/export_agreement.py; 4 windows x 512 tokens):
#   GGUF Q8_0 / Q4_0 / Q4_1 in transformers (gguf_file=) and in llama.cpp itself (bench/llamacpp/setup.sh builds it),
#   compressed-tensors pack-quantized / int-quantized / a pruned model's dense export in transformers +
#   compressed-tensors, and, as the engine's own baseline, llama.cpp on the embedded GGUF file against lowbit's
#   float32 conversion of it. Then the speed of llama.cpp on those GGUF files (bench/llamacpp/speed.py) and of
#   lowbit's fast backend on the same weights (`lowbit bench`), back to back.
# Reuses the models bench/methods.sh and bench/runtime.sh wrote to out/bench/methods (quantizing any that are
# missing, 64 x 512 calibration tokens). Writes bench/results/exports/.
#   usage: bench/exports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
LOWBIT=.venv/bin/lowbit
MODELS=out/bench/methods
RESULTS=bench/results/exports
mkdir -p "$RESULTS" "$MODELS"
bench/llamacpp/setup.sh
quantize() {  # name, recipe (preset or file), extra options
  local name=$1 recipe=$2; shift 2
  if [ ! -f "$MODELS/$name/lowbit_config.json" ]; then
    $LOWBIT quantize --recipe "$recipe" --nsamples 64 --seq-len 512 --out "$MODELS/$name" --overwrite "$@"
  fi
}
quantize w8g32-sym bench/recipes/w8g32-sym.json
quantize gptq-w4g32-sym bench/recipes/gptq-w4g32-sym.json
quantize gptq-w4g32 gptq-w4g32
quantize smoothquant-w8a8 smoothquant-w8a8
quantize wanda-2of4 wanda-2of4
for name in w8g32-sym gptq-w4g32-sym gptq-w4g32; do
  $LOWBIT export "$MODELS/$name" --format gguf --out "$MODELS/$name/model.gguf" --overwrite
done
for name in gptq-w4g32-sym smoothquant-w8a8 wanda-2of4; do
  $LOWBIT export "$MODELS/$name" --format compressed-tensors --out "$MODELS/$name-ct" --overwrite
done
agreement() {  # lowbit folder (or model), export, result name, reader
  .venv/bin/python bench/export_agreement.py "$1" "$2" --reader "$4" --results "$RESULTS/$3.json"
}
embedded=$(.venv/bin/python -c "from lowbit.models.embedded import EMBEDDED_MODELS; print(EMBEDDED_MODELS['smollm2-135m'].verified_path())")
agreement smollm2-135m "$embedded" embedded_q4_1_llamacpp llama.cpp
for name in w8g32-sym gptq-w4g32-sym gptq-w4g32; do
  agreement "$MODELS/$name" "$MODELS/$name/model.gguf" "${name}_gguf_llamacpp" llama.cpp
  agreement "$MODELS/$name" "$MODELS/$name/model.gguf" "${name}_gguf_transformers" transformers
done
for name in gptq-w4g32-sym smoothquant-w8a8 wanda-2of4; do
  agreement "$MODELS/$name" "$MODELS/$name-ct" "${name}_ct_transformers" transformers
done
.venv/bin/python bench/exports_table.py "$RESULTS" > "$RESULTS/exports.md"
cat "$RESULTS/exports.md"
# speed: llama.cpp on the GGUF files, and lowbit's fast backend on the same weights, one after the other (idle machine)
out/llamacpp/venv/bin/python bench/llamacpp/speed.py "$embedded" "$MODELS/w8g32-sym/model.gguf" \
  "$MODELS/gptq-w4g32-sym/model.gguf" "$MODELS/gptq-w4g32/model.gguf" --results "$RESULTS/llamacpp_speed.json"
$LOWBIT bench "$MODELS/w8g32-sym" "$MODELS/gptq-w4g32-sym" "$MODELS/gptq-w4g32" --backends fast --new-tokens 16 \
  --repeats 3 --results "$RESULTS/lowbit_same_run"
