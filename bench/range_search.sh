#!/usr/bin/env bash
# Range search (the "mse" and "imatrix-mse" fits, numerics/range_search.py) next to min-max grids, each row a
# `lowbit compare` row (bench/results/range_search*/; --resume keeps rows already measured).
# On the embedded SmolLM2-135M (default) the min-max rows are measured again beside the searched ones, so times
# compare within one run (4-7 minutes a row on two CPU cores); MODEL=qwen2.5-coder-0.5b: round-to-nearest rows only
# (GPTQ there takes ~25 minutes a row). The protocol per model: bench/compare_protocol.sh.
# Extra recipe names replace the default list.
#   usage: [MODEL=qwen2.5-coder-0.5b] bench/range_search.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/compare_protocol.sh range_search
if [ "$MODEL" = smollm2-135m ]; then
  RECIPES=(w3g128-mse w3g128-imse gptq-w3g128-mse gptq-w3g128-imse w4g128-mse w4g128-imse gptq-w4g128-mse
    gptq-w4g128-imse awq-w3g128-imse w3g128 gptq-w3g128 w4g128 gptq-w4g128)  # min-max rows last
else
  RECIPES=(w3g128 w3g128-mse w3g128-imse w4g128 w4g128-mse w4g128-imse)
fi
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" --no-inspect \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
