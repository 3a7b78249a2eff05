#!/usr/bin/env bash
# AutoRound next to GPTQ, AWQ and round-to-nearest, each row a `lowbit compare` row (--resume keeps rows already
# measured; the protocol per model: bench/compare_protocol.sh). On the embedded SmolLM2-135M (default) the default
# row is the light W3 g128 one (auto-round's own light setting: 50 steps, lr 5e-3; 875 s on two CPU cores), beside
# bench/methods.sh's GPTQ and AWQ rows of the same protocol (bench/results/methods). On a real model
# (MODEL=gemma3-270m, qwen2.5-coder-0.5b) the default rows are the light setting at W2 g64, W3 g128 and W4 g128, each
# with its RTN, GPTQ and AWQ neighbours, all in one report. The published 200 steps take about four times the light setting's tuning.
# Writes bench/results/$NAME (NAME: autoround, or autoround-MODEL). Extra recipe names replace the default list.
#   usage: [MODEL=gemma3-270m] [NAME=...] bench/autoround.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/compare_protocol.sh "${NAME:-autoround}"
LIGHT=bench/recipes/autoround-light
if [ "$MODEL" = smollm2-135m ]; then RECIPES=("$LIGHT-w3g128.json"); else
  RECIPES=()
  for grid in w2g64 w3g128 w4g128; do RECIPES+=("$grid" "gptq-$grid" "awq-$grid" "$LIGHT-$grid.json"); done
fi
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" --no-inspect \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
