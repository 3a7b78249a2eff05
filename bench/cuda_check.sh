#!/usr/bin/env bash
# The CUDA path, for a session that is lent a GPU machine (the device tool; CI and the project's own machine have
# none). Run from the repository root there, with that machine's python3 (it has torch with CUDA and transformers;
# lowbit runs from src/, gguf and compressed-tensors are not needed). About 5 minutes on one H200.
#  1. tests/test_cuda_kernels.py: tinygemm int4 and cuBLASLt int8 x int8 against the exact path, the shapes they
#     refuse, and a toy model of each runtime module loaded on CUDA against the CPU's logits;
#  2. `lowbit bench --device cuda` of a random Llama of TinyLlama-1.1B's shape, quantized data-free (RTN W4 g128,
#     dynamic W8A8, LLM.int8()), exact and fast backends, against fp32 and bf16 of the same model in one run;
#  3. on a machine with 2 or more GPUs: GPTQ W4 g128 of the same model calibrated on 1 GPU and on every GPU
#     (`--nproc N --device cuda`, NCCL), wall times and the two outputs' agreement (docs/distributed.md).
# The random model needs a tokenizer folder: TOKENIZER (default out/cuda/tokenizer, which `bench/cuda_check.sh
# --prepare` fills here from the embedded model's converted folder; carry it to the device machine).
#   usage: bench/cuda_check.sh --prepare       (here, before the device run)
#          bench/cuda_check.sh                 (there; results under $OUT, else out/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
TOKENIZER=${TOKENIZER:-out/cuda/tokenizer}
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$TOKENIZER"
  folder=$(.venv/bin/python -c "from lowbit.models.source import resolve_model; print(resolve_model('smollm2-135m').folder)")
  cp "$folder"/tokenizer*.json "$TOKENIZER"/
  # calibration text for step 3 (the device machine has no embedded text package): the embedded calibration part
  .venv/bin/python -c "from lowbit.data.text import documents; print('\n\n'.join(documents('wiki', 'calibration')[:4000]))" \
    > "$TOKENIZER/../calib.txt"
  exit 0
fi
OUT=${OUT:-out/cuda}
PY=${PYTHON:-python3}
MODELS=${MODELS:-/tmp/lowbit-cuda}
mkdir -p "$OUT" "$MODELS"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tee "$OUT/cuda_tests.log"
$PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from peak_memory import synthetic_llama; \
synthetic_llama(Path('$MODELS/base'), Path('$TOKENIZER'))"
for recipe in w4g128 w8a8-token llm-int8; do
  $PY -m lowbit.cli.main quantize --model "$MODELS/base" --recipe $recipe --device cuda --out "$MODELS/$recipe" --overwrite
done
$PY -m lowbit.cli.main bench "$MODELS/w4g128" "$MODELS/w8a8-token" "$MODELS/llm-int8" --baseline "$MODELS/base" \
  --device cuda --backends exact fast --new-tokens 32 --repeats 3 --results "$OUT" 2>&1 | tee "$OUT/bench.log"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  for n in 1 "$GPUS"; do
    start=$(date +%s.%N)
    $PY -m lowbit.cli.main --quiet quantize --model "$MODELS/base" --recipe gptq-w4g128 --device cuda --nproc "$n" \
      --calib "$TOKENIZER/../calib.txt" --nsamples 256 --seq-len 2048 --out "$MODELS/gptq-$n" --overwrite --json \
      > "$OUT/distributed-$n.json"
    echo "gptq-w4g128 on $n GPU(s): $(echo "$(date +%s.%N) - $start" | bc) s wall" | tee -a "$OUT/distributed.log"
  done
  $PY -c "import sys; sys.path.insert(0, 'bench'); from distributed import agreement; from pathlib import Path; \
print(agreement(Path('$MODELS/gptq-1'), Path('$MODELS/gptq-$GPUS')))" | tee -a "$OUT/distributed.log"
else
  echo "one GPU: the 1 vs N GPU calibration timing needs 2 or more" | tee "$OUT/distributed.log"
fi
