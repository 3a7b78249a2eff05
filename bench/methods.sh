#!/usr/bin/env bash
# The method comparison on the embedded SmolLM2-135M: every row quantized from the same 64 x 512 calibration tokens
# and evaluated on the same held-out Wikipedia windows. Writes bench/results/methods/results.{json,md,png}; the
# quantized models go to out/bench/methods (not committed). Rows already measured with identical settings are kept
# (--resume), so an interrupted run continues where it stopped. Takes about 1.5 hours on 2 CPU cores.
#   usage: bench/methods.sh [extra `lowbit compare` options, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
RECIPES=(
  # the table issue 3 asks for, cheapest first so an interrupted run has the most rows
  w4g128 gptq-w4g128 gptq-w4g128-actorder
  w3g128 w8a8-naive smoothquant-w8a8 llm-int8 wanda-50 wanda-2of4
  gptq-w3g128 sparsegpt-50 awq-w4g128 awq-w3g128
  # the steps in between, which show what each fix repairs
  w8 w8a8-token smoothquant-w8a8-static smoothquant-all-w8a8-static magnitude-50
)
exec .venv/bin/lowbit compare --recipes "${RECIPES[@]}" --nsamples 64 --seq-len 512 \
  --out out/bench/methods --results bench/results/methods --resume "$@"
