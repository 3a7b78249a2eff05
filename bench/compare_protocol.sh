# Sourced by the `lowbit compare` benchmarks (bench/range_search.sh, bench/mixed_precision.sh) with their results
# name: from MODEL (default smollm2-135m) sets PROTOCOL (the model and its calibration and evaluation options) and
# RESULTS (bench/results/NAME, or NAME-MODEL). The default model: the method comparison's protocol (bench/methods.sh:
# 64 x 512 calibration tokens, 16 x 2048 evaluation tokens). MODEL=qwen2.5-coder-0.5b or gemma3-270m: the real
# GGUF that `FETCH_ONLY=1 bench/real_models.sh MODEL` installs, with that script's protocol (16 x 512
# calibration tokens, 8 x 512 evaluation tokens).
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
MODEL=${MODEL:-smollm2-135m}
if [ "$MODEL" = smollm2-135m ]; then
  PROTOCOL=(--nsamples 64 --seq-len 512)
  RESULTS=bench/results/$1
else
  case "$MODEL" in  # bench/real_models.sh's file names
    gemma3-270m) FILE=out/realmodels/gemma-3-270m-q4_k_m.gguf ;;
    *) FILE=out/realmodels/$MODEL-instruct.gguf ;;
  esac
  [ -f "$FILE" ] || { echo "$(basename "$0"): $FILE is missing; run FETCH_ONLY=1 bench/real_models.sh $MODEL" >&2; exit 2; }
  PROTOCOL=("$FILE" --nsamples 16 --seq-len 512 --max-windows 8 --window 512)
  export LOWBIT_CACHE=out/realmodels/cache  # the float32 folder bench/real_models.sh converted the GGUF into
  RESULTS=bench/results/$1-$MODEL
fi
