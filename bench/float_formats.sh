#!/usr/bin/env bash
# The float formats (FP8, NVFP4, MXFP4) against the integer grids of their size class, each row a `lowbit compare`
# row from the same calibration tokens, evaluated on the same held-out Wikipedia windows (the protocol per MODEL:
# bench/compare_protocol.sh; the embedded SmolLM2-135M by default, with the method comparison's protocol). Writes
# bench/results/float_formats*/results.{json,md,png}; the quantized models go to out/bench/ (not committed).
# --resume keeps rows already measured. Extra recipe names replace the default list.
#   usage: [MODEL=qwen2.5-coder-0.5b] bench/float_formats.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/compare_protocol.sh float_formats
if [ "$MODEL" = smollm2-135m ]; then
  # the INT rows of the same protocol (w8a8-token, w4g128, gptq-w4g128) are in bench/results/methods
  RECIPES=(
    fp8-dynamic fp8 nvfp4a16 mxfp4a16 w4g32-sym
    gptq-nvfp4a16 gptq-mxfp4a16 gptq-w4g32-sym awq-nvfp4a16 nvfp4 mxfp4
    # where FP8 W8A8's error comes from, and what repairs it
    bench/recipes/fp8-weights.json gptq-fp8-dynamic
  )
else  # a real model: FP8 W8A8 beside INT8 W8A8 and the weight-only rows that say where the error comes from
  RECIPES=(fp8-dynamic fp8 bench/recipes/fp8-weights.json gptq-fp8-dynamic w8a8-token smoothquant-w8a8 w8
           nvfp4a16 mxfp4a16 w4g128)
fi
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
