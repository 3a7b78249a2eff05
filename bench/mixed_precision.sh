#!/usr/bin/env bash
# Mixed precision to a budget (`-bB` recipes, pipeline/sensitivity.py) against the uniform grids around it, each row
# a `lowbit compare` row (bench/results/mixed_precision*/; --resume keeps rows already measured; the protocol per
# MODEL: bench/compare_protocol.sh). `bench/mixed_precision_table.py [FOLDER]` prints each row's stored bits per
# weight beside its perplexity. Extra recipe names replace the default list (RTN rows).
#   usage: [MODEL=qwen2.5-coder-0.5b] bench/mixed_precision.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/compare_protocol.sh mixed_precision
RECIPES=(w4g128-b3.5 w3g128 w3g64 w3g32 w4pc w4g128)
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" --no-inspect \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
