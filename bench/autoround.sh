#!/usr/bin/env bash
# AutoRound on the embedded SmolLM2-135M with the method comparison's protocol (bench/methods.sh: 64 x 512
# calibration tokens, 16 x 2048 held-out evaluation tokens), so its rows sit beside that table's GPTQ and AWQ rows
# (bench/results/methods). The light W3 g128 row (auto-round's own light setting: 50 steps, lr 5e-3) took 875 s
# on two CPU cores; the published 200 steps would take about four times its tuning (an estimate). Writes
# bench/results/autoround/; --resume keeps rows already measured. Extra options go to `lowbit compare`.
#   usage: bench/autoround.sh [RECIPE ...]  (default: the light W3 g128 row)
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
NAME="${NAME:-autoround}"  # the results folder: bench/results/$NAME
RECIPES=("${@:-bench/recipes/autoround-light-w3g128.json}")
exec .venv/bin/lowbit compare --recipes "${RECIPES[@]}" --nsamples 64 --seq-len 512 --no-inspect \
  --out "out/bench/$NAME" --results "bench/results/$NAME" --resume
