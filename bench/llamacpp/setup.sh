#!/usr/bin/env bash
# llama.cpp, the engine lowbit's GGUF exports are for, in its own virtual environment (out/llamacpp/venv, ignored by
# git): llama-cpp-python, which compiles llama.cpp from its PyPI source release with the machine's gcc and cmake
# (about 4 minutes on 2 cores). It needs no torch. bench/export_agreement.py --reader llama.cpp drives it through
# bench/llamacpp/logits.py. What was installed is written to bench/results/exports/versions-llamacpp.txt.
#   usage: bench/llamacpp/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=out/llamacpp/venv
if [ -f "$VENV/.installed" ]; then echo "llama.cpp: $VENV already installed"; exit 0; fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# --no-binary: the source release, built for this CPU (a prebuilt wheel, where one exists, may target another)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VENV/bin/pip" install --quiet --no-binary llama-cpp-python \
  llama-cpp-python==0.3.36
mkdir -p bench/results/exports
"$VENV/bin/pip" freeze > bench/results/exports/versions-llamacpp.txt
touch "$VENV/.installed"
