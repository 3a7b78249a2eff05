#!/usr/bin/env bash
# One virtual environment per peer tool for bench/peers/run.sh, under out/peers/venvs (ignored by git).
# Each gets the same local torch==2.13.0 CPU build first and keeps it: bench/peers/constraints.txt pins torch, so a
# peer that asks for a newer torch fails to resolve here instead of silently pulling a multi-GB CUDA build.
# The peers' own versions are pinned in the constraints file too; what was installed is written to
# bench/results/peers/versions-<tool>.txt.
#   usage: bench/peers/setup.sh [llmcompressor] [gptqmodel]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENVS=out/peers/venvs
CONSTRAINTS=bench/peers/constraints.txt
mkdir -p "$VENVS" bench/results/peers
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(llmcompressor gptqmodel)
for tool in "${tools[@]}"; do
  venv=$VENVS/$tool
  if [ -f "$venv/.installed" ]; then echo "$tool: $venv already installed"; continue; fi
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.13.0
  case $tool in
    llmcompressor) "$venv/bin/pip" install --quiet -c "$CONSTRAINTS" llmcompressor gguf ;;
    # No CUDA here: GPTQModel's CPU path is its torch kernel; skip building CUDA extensions.
    gptqmodel) BUILD_CUDA_EXT=0 "$venv/bin/pip" install --quiet -c "$CONSTRAINTS" --no-build-isolation gptqmodel gguf ;;
    *) echo "unknown tool $tool (choose llmcompressor or gptqmodel)" >&2; exit 2 ;;
  esac
  "$venv/bin/pip" freeze > "bench/results/peers/versions-$tool.txt"
  touch "$venv/.installed"
done
