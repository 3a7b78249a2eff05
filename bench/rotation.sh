#!/usr/bin/env bash
# Rotations (QuaRot's offline rotation of the residual stream, `rotate-` recipes, methods/rotate.py) against the
# same recipes unrotated and SmoothQuant: W4A8, W4A4, W8A8 and weight-only rows, each a `lowbit compare` row
# (bench/results/rotation*/; --resume keeps rows already measured; the protocol per MODEL:
# bench/compare_protocol.sh). Extra recipe names replace the default list.
#   usage: [MODEL=qwen2.5-coder-0.5b] bench/rotation.sh [RECIPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/compare_protocol.sh rotation
RECIPES=(rotate-w4a8 w4a8 gptq-w4a8 rotate-gptq-w4a8 rotate-gptq-w4a4 gptq-w4a4 w8a8-token rotate-w8a8-token
         quarot-gptq-w4a8 quarot-gptq-w4a4 quarot-gptq-w4a8-actorder)  # docs/rotation.md's SmolLM2 rows
if [ $# -gt 0 ]; then RECIPES=("$@"); fi
exec .venv/bin/lowbit compare "${PROTOCOL[@]}" --recipes "${RECIPES[@]}" --no-inspect \
  --out "out/bench/$(basename "$RESULTS")" --results "$RESULTS" --resume
