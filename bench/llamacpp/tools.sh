#!/usr/bin/env bash
# llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built from the llama.cpp source
# that the pinned llama-cpp-python source release vendors (the same llama.cpp as bench/llamacpp/setup.sh), into
# out/llamacpp/tools/bin (ignored by git). Needs gcc, cmake and ninja; about 10 minutes on 2 cores. llama.cpp's
# convert_hf_to_gguf.py (the F32 reference file) runs in lowbit's environment and also needs sentencepiece, installed
# there by name. bench/llamacpp/kquants.py drives them.
#   usage: bench/llamacpp/tools.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36  # keep equal to setup.sh's llama-cpp-python pin
ROOT=out/llamacpp/tools
BIN=$ROOT/bin
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m pip install --quiet sentencepiece==0.2.3  # convert_hf_to_gguf.py imports it for Llama vocabularies
if [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ] && [ -x "$BIN/llama-perplexity" ]; then
  echo "llama.cpp tools: $BIN already built"; exit 0
fi
mkdir -p "$ROOT"
if [ ! -d "$ROOT/llama_cpp_python-$VERSION" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$ROOT" "llama-cpp-python==$VERSION"
  tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi
SRC=$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp
cmake -S "$SRC" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > "$ROOT/cmake.log"
cmake --build "$ROOT/build" -j "${JOBS:-2}" --target llama-quantize llama-imatrix llama-perplexity > "$ROOT/build.log"
mkdir -p "$BIN"
cp "$ROOT/build/bin/llama-quantize" "$ROOT/build/bin/llama-imatrix" "$ROOT/build/bin/llama-perplexity" "$BIN/"
"$BIN/llama-quantize" --help 2>&1 | head -1 || true
echo "llama.cpp tools: built in $BIN from llama-cpp-python $VERSION's vendored llama.cpp"
