#!/usr/bin/env bash
# Range search (the "mse" and "imatrix-mse" fits, numerics/range_search.py) on the embedded SmolLM2-135M with the
# method comparison's protocol (bench/methods.sh: 64 x 512 calibration tokens, 16 x 2048 held-out evaluation
# tokens), so its rows sit beside that table's min-max rows (bench/results/methods: w3g128, gptq-w3g128, w4g128,
# gptq-w4g128; measured again here, so times compare within one run). Writes bench/results/range_search/; --resume
# keeps rows already measured (4-7 minutes a row on two CPU cores). Extra recipe names replace the default list.
#   usage: bench/range_search.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
RECIPES=(w3g128-mse w3g128-imse gptq-w3g128-mse gptq-w3g128-imse w4g128-mse w4g128-imse gptq-w4g128-mse gptq-w4g128-imse
  w3g128 gptq-w3g128 w4g128 gptq-w4g128)  # the min-max rows again, timed in the same run
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare --recipes "${RECIPES[@]}" --nsamples 64 --seq-len 512 --no-inspect \
  --out out/bench/range_search --results bench/results/range_search --resume
