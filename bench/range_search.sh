#!/usr/bin/env bash
# Range search (the "mse" and "imatrix-mse" fits, numerics/range_search.py) next to min-max grids, each row a
# `lowbit compare` row (bench/results/range_search*/; --resume keeps rows already measured).
# On the embedded SmolLM2-135M (default) with the method comparison's protocol (bench/methods.sh: 64 x 512
# calibration tokens, 16 x 2048 held-out evaluation tokens); the min-max rows are measured again beside the
# searched ones, so times compare within one run (4-7 minutes a row on two CPU cores).
# MODEL=qwen2.5-coder-0.5b: the real Qwen2.5-Coder 0.5B GGUF that `FETCH_ONLY=1 bench/real_models.sh
# qwen2.5-coder-0.5b` installs and checks, with bench/real_models.sh's protocol (16 x 512 calibration tokens,
# 8 x 512 evaluation tokens), round-to-nearest rows only (GPTQ there takes ~25 minutes a row).
# Extra recipe names replace the default list.
#   usage: [MODEL=qwen2.5-coder-0.5b] bench/range_search.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
MODEL=${MODEL:-smollm2-135m}
if [ "$MODEL" = smollm2-135m ]; then
  RECIPES=(w3g128-mse w3g128-imse gptq-w3g128-mse gptq-w3g128-imse w4g128-mse w4g128-imse gptq-w4g128-mse
    gptq-w4g128-imse w3g128 gptq-w3g128 w4g128 gptq-w4g128)  # the min-max rows last, timed in the same run
  PROTOCOL=(--nsamples 64 --seq-len 512)  # the default model: the earlier rows resume
  RESULTS=bench/results/range_search
else
  FILE=out/realmodels/$MODEL-instruct.gguf
  [ -f "$FILE" ] || { echo "range_search.sh: $FILE is missing; run FETCH_ONLY=1 bench/real_models.sh $MODEL" >&2; exit 2; }
  RECIPES=(w3g128 w3g128-mse w3g128-imse w4g128 w4g128-mse w4g128-imse)
  PROTOCOL=("$FILE" --nsamples 16 --seq-len 512 --max-windows 8 --window 512)
  export LOWBIT_CACHE=out/realmodels/cache  # the float32 folder bench/real_models.sh converted the GGUF into
  RESULTS=bench/results/range_search-$MODEL
fi
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" --no-inspect \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
