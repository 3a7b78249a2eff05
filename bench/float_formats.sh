#!/usr/bin/env bash
# The float formats (FP8, NVFP4, MXFP4) against the integer grids of their size class on the embedded SmolLM2-135M,
# with the method comparison's protocol (bench/methods.sh): every row from the same 64 x 512 calibration tokens,
# evaluated on the same held-out Wikipedia windows. Writes bench/results/float_formats/results.{json,md,png}; the
# quantized models go to out/bench/float_formats (not committed). --resume keeps rows already measured.
#   usage: bench/float_formats.sh [extra `lowbit compare` options]
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
# the INT rows of the same protocol (w8a8-token, w4g128, gptq-w4g128) are in bench/results/methods
RECIPES=(
  fp8-dynamic fp8 nvfp4a16 mxfp4a16 w4g32-sym
  gptq-nvfp4a16 gptq-mxfp4a16 gptq-w4g32-sym awq-nvfp4a16 nvfp4 mxfp4
  # where FP8 W8A8's error comes from, and what repairs it
  bench/recipes/fp8-weights.json gptq-fp8-dynamic
)
exec .venv/bin/lowbit compare --recipes "${RECIPES[@]}" --nsamples 64 --seq-len 512 \
  --out out/bench/float_formats --results bench/results/float_formats --resume "$@"
