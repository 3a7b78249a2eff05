"""lowbit's K-quant GGUF files against llama.cpp's own llama-quantize, both judged by llama.cpp's llama-perplexity on the
same evaluation text.

For one model and one llama.cpp mix (default Q4_K_M):
  float      the model as an F32 GGUF, by llama.cpp's convert_hf_to_gguf.py from the float folder lowbit quantizes
             (--float-from-gguf: by llama-quantize from the .gguf --model itself: the same float32 values)
  llama.cpp  llama-quantize MIX of that file, without and with an importance matrix (llama-imatrix on the calibration
             text lowbit calibrates on: the same documents in the same seeded order, --chunks N of --seq-len tokens);
             lowbit's Q2_K_M is llama-quantize's Q2_K, and Q2_K_S runs with the importance matrix only (it refuses
             to make Q2_K_S without one)
  lowbit     `lowbit quantize --recipe {q4_k_m, gptq-q4_k_m, awq-q4_k_m} --format gguf` (RTN, GPTQ, AWQ on the same
             mix of types, the embedding and head too), N x seq-len calibration tokens, the same seed
Every file is evaluated by `llama-perplexity -c CTX --chunks K` on the evaluation documents (lowbit's held-out part of
the text, joined as lowbit joins them). The per-tensor types of lowbit's file and llama-quantize's are compared (the
mix rules of numerics/kquant_mix.py against llama.cpp's own choice on this model).

    bench/llamacpp/tools.sh     (once: builds llama-quantize, llama-imatrix, llama-perplexity)
    .venv/bin/python bench/llamacpp/kquants.py [--model smollm2-135m|FILE.gguf|DIR] [--mix Q4_K_M] [--float-from-gguf]
        [--methods rtn imatrix gptq awq] [--nsamples 16] [--seq-len 512] [--ctx 512] [--chunks 40] [--seed 0] [--fresh]

Writes bench/results/llamacpp/kquants-<model>-<mix>.json and prints a Markdown table. Work files (GGUFs, logs) go to
out/llamacpp/kquants/<model>/ and are reused unless --fresh, perplexity logs too while newer than their file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "out" / "llamacpp" / "tools"
BIN = TOOLS / "bin"
WORK = REPO / "out" / "llamacpp" / "kquants"
RESULTS = REPO / "bench" / "results" / "llamacpp"
LOWBIT = Path(sys.executable).parent / "lowbit"  # the lowbit of the environment running this script
os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # a GGUF source's exact weights (docs/gguf_import.md)


def run(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; exit with the log's tail if it fails. Returns wall seconds."""
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{tail}")
    return time.perf_counter() - start


def texts(nsamples: int, seq_len: int, seed: int) -> tuple[str, str]:
    """(calibration text, evaluation text): lowbit's own parts of its default text, the calibration documents in the
    order `lowbit quantize --seed` draws them (data/calibration.py), cut after about twice the tokens it needs."""
    from lowbit.data.text import DEFAULT_TEXT, documents

    calibration = documents(DEFAULT_TEXT, "calibration")
    order = list(range(len(calibration)))
    random.Random(seed).shuffle(order)
    chosen, chars = [], 0
    for i in order:  # ~4 characters a token: enough text for N sequences, with room to spare
        chosen.append(calibration[i] + "\n\n")
        chars += len(chosen[-1])
        if chars > 8 * nsamples * seq_len:
            break
    return "".join(chosen), "\n\n".join(documents(DEFAULT_TEXT, "evaluation"))


FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(model: Path, text: Path, ctx: int, chunks: int, log: Path, reuse: bool) -> tuple[float, float, float | None]:
    """llama-perplexity's final estimate: (perplexity, its +/- error, seconds). With ``reuse``, a finished log
    written after the model file (by the same command: its name holds ctx and chunks) is read instead (seconds:
    None)."""
    if reuse and log.exists() and log.stat().st_mtime > model.stat().st_mtime:
        done = FINAL.search(log.read_text(errors="replace"))
        if done is not None:
            return float(done[1]), float(done[2]), None
    seconds = run([str(BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
                   str(chunks), "-t", str(os.cpu_count() or 1)], log)
    found = FINAL.search(log.read_text(errors="replace"))
    if found is None:
        sys.exit(f"no final perplexity in {log}")
    return float(found[1]), float(found[2]), seconds


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def cpu() -> str:
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", info)
        have = set(re.search(r"flags\s*:\s*(.*)", info)[1].split())  # type: ignore[index]
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni") if f in have)
        return f"{model[1] if model else platform.processor()} ({flags}), {os.cpu_count()} cores"
    except OSError:
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the embedded default, a .gguf or a folder")
    parser.add_argument("--mix", default="Q4_K_M", help="a llama.cpp mix lowbit has (numerics/kquant_mix.py)")
    parser.add_argument("--float-from-gguf", action="store_true",
                        help="a .gguf --model: make the F32 reference by llama.cpp's own dequantization of that file "
                             "(llama-quantize --allow-requantize ... F32) instead of convert_hf_to_gguf.py on the "
                             "folder lowbit imported it into (whose converter needs a tokenizer.model for Gemma)")
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"], choices=["rtn", "imatrix", "gptq", "awq"])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity's context")
    parser.add_argument("--chunks", type=int, default=40, help="llama-perplexity's chunks of --ctx tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="redo every step, ignoring earlier files")
    args = parser.parse_args()
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        if not (BIN / tool).is_file():
            sys.exit(f"{BIN / tool} is missing: run bench/llamacpp/tools.sh first")
    from lowbit.models.source import resolve_model
    from lowbit.numerics.kquant_mix import K_MIXES, LLAMA_FTYPES

    mix = args.mix.upper()
    if mix not in K_MIXES:
        sys.exit(f"--mix must be one of {', '.join(K_MIXES)}")
    name = Path(args.model).name.removesuffix(".gguf").lower() if os.sep in args.model or args.model.endswith(".gguf") else args.model
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    fresh = args.fresh

    def missing(path: Path) -> bool:
        return fresh or not path.exists()

    calibration, evaluation = texts(args.nsamples, args.seq_len, args.seed)
    (work / "calibration.txt").write_text(calibration)
    (work / "evaluation.txt").write_text(evaluation)
    folder = resolve_model(args.model).folder
    convert = next(TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    rows: list[dict] = []
    float_gguf = work / "float-f32.gguf"
    seconds = {}
    if missing(float_gguf) and args.float_from_gguf:
        if not args.model.endswith(".gguf"):
            sys.exit("--float-from-gguf needs a .gguf --model")
        seconds["convert"] = run([str(BIN / "llama-quantize"), "--allow-requantize", args.model, str(float_gguf), "F32"],
                                 work / "convert.log")
    elif missing(float_gguf):
        seconds["convert"] = run([sys.executable, str(convert), str(folder), "--outfile", str(float_gguf),
                                  "--outtype", "f32"], work / "convert.log")
    imatrix = work / f"imatrix-{args.nsamples}x{args.seq_len}-seed{args.seed}.gguf"
    if missing(imatrix):
        seconds["imatrix"] = run([str(BIN / "llama-imatrix"), "-m", str(float_gguf), "-f", str(work / "calibration.txt"),
                                  "-o", str(imatrix), "-c", str(args.seq_len), "--chunks", str(args.nsamples),
                                  "-t", str(os.cpu_count() or 1)], work / "imatrix.log")
    files = {"float (F32)": float_gguf}
    ftype = LLAMA_FTYPES.get(mix, mix)  # llama-quantize's name (lowbit's Q2_K_M is its Q2_K)
    # llama-quantize refuses Q2_K_S without an importance matrix
    theirs = [(f"llama-quantize {ftype}", [], "llamacpp")] if mix != "Q2_K_S" else []
    theirs.append((f"llama-quantize {ftype} + imatrix", ["--imatrix", str(imatrix)], "llamacpp-imatrix"))
    for label, extra, stem in theirs:
        path = work / f"{stem}-{mix}.gguf"
        if missing(path):
            seconds[label] = run([str(BIN / "llama-quantize"), *extra, str(float_gguf), str(path), ftype],
                                 work / f"{stem}-{mix}.log")
        files[label] = path
    for method in args.methods:
        recipe = mix.lower() if method == "rtn" else f"{method}-{mix.lower()}"
        out = work / f"lowbit-{recipe}-{args.nsamples}x{args.seq_len}-seed{args.seed}"
        if missing(out / "model.gguf"):
            seconds[f"lowbit {recipe}"] = run(
                [str(LOWBIT), "quantize", "--model", args.model, "--recipe", recipe, "--format", "gguf", "--out", str(out),
                 "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
                 "--overwrite"], work / f"lowbit-{recipe}.log")
        files[f"lowbit {recipe}"] = out / "model.gguf"
    reference = tensor_types(files[theirs[0][0]])
    for label, path in files.items():
        log = work / f"ppl-{path.parent.name if path.name == 'model.gguf' else path.stem}-c{args.ctx}x{args.chunks}.log"
        ppl, err, ppl_seconds = perplexity(path, work / "evaluation.txt", args.ctx, args.chunks, log, not fresh)
        types = tensor_types(path)
        differ = sorted(n for n in reference if label.startswith("lowbit") and types.get(n) != reference[n])
        rows.append({"file": label, "ppl": ppl, "ppl_err": err, "mib": path.stat().st_size / 2**20,
                     "types": {t: list(types.values()).count(t) for t in sorted(set(types.values()))},
                     "types_unlike_llama_quantize": [f"{n}: {types.get(n)} vs {reference[n]}" for n in differ],
                     "seconds_to_make": seconds.get(label), "seconds_to_evaluate": ppl_seconds})
        print(f"{label}: PPL {ppl:.4f} +/- {err:.4f}, {rows[-1]['mib']:.1f} MiB", flush=True)
    result = {
        "model": name, "mix": mix, "nsamples": args.nsamples, "seq_len": args.seq_len, "seed": args.seed,
        "ctx": args.ctx, "chunks": args.chunks, "cpu": cpu(), "rows": rows,
        "command": "bench/llamacpp/kquants.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"kquants-{name}-{mix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| file | llama-perplexity (c={args.ctx}, {args.chunks} chunks) | MiB | tensor types |")
    print("|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in r["types"].items())
        print(f"| {r['file']} | {r['ppl']:.4f} +/- {r['ppl_err']:.4f} | {r['mib']:.1f} | {types} |")
    for r in rows:
        if r["types_unlike_llama_quantize"]:
            print(f"{r['file']}: {len(r['types_unlike_llama_quantize'])} tensors typed unlike llama-quantize's: "
                  + "; ".join(r["types_unlike_llama_quantize"][:6]))


if __name__ == "__main__":
    main()
