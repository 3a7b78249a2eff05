"""lowbit next to llm-compressor and GPTQModel on one model: the same float32 input folder, the same calibration
token ids per seed, the same evaluation windows, and one evaluator (lowbit's perplexity function) for every tool's
output, each loaded the way that tool's users load it.

Every (tool, method) is quantized once per calibration seed (--seeds), --repeats times, each in a fresh process; its wall time (process start to exit, model load and save included) and peak RSS (the child's own,
from wait4) are recorded each time, and each output is evaluated. A row reports the medians over its runs:
perplexity over the seeds, time and memory over the runs. Results accumulate in
bench/results/peers/<model>-g<G>/results.json, so an interrupted run resumes where it stopped; its report.md and
the summary across models (bench/results/peers/summary.md) are rewritten after every step.

  usage: bench/peers/setup.sh && .venv/bin/python bench/peers/prepare.py --model M &&
         .venv/bin/python bench/peers/run.py --model M [--group-size G] [--seeds 0 1 2] [--repeats 1] [--tools ...]
             [--methods ...]
  (M: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, or a folder / .gguf; methods are named without the group:
   gptq-w4 is run as gptq-w4g<G>)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_report, write_summary
from shared import MODELS, REPO, WORK, ids_file, model_folder, model_name, shared_inputs

RESULTS = REPO / "bench" / "results" / "peers"
PYTHON = {
    "lowbit": REPO / ".venv" / "bin" / "python",
    "lowbit-bf16": REPO / ".venv" / "bin" / "python",
    "llmcompressor": WORK / "venvs" / "llmcompressor" / "bin" / "python",
    "gptqmodel": WORK / "venvs" / "gptqmodel" / "bin" / "python",
}
# "w4" methods run on the group size of the run (--group-size): gptq-w4 -> gptq-w4g128
METHODS = ("rtn-w4", "gptq-w4", "gptq-w4-actorder", "awq-w4", "smoothquant-w8a8", "wanda-50", "wanda-2of4",
           "sparsegpt-50")
SUPPORTED = {
    "lowbit": METHODS,
    # the same, with the calibration forwards in bfloat16 (--compute-dtype; RTN has none)
    "lowbit-bf16": tuple(m for m in METHODS if m != "rtn-w4"),
    "llmcompressor": METHODS,
    "gptqmodel": ("gptq-w4", "gptq-w4-actorder", "awq-w4"),
}


def grouped(method: str, group: int) -> str:
    return method.replace("-w4", f"-w4g{group}", 1)


def lowbit_recipe(method: str) -> str:
    return method.removeprefix("rtn-")  # otherwise the method name is lowbit's recipe name


def quantize_command(tool: str, method: str, out: Path, model: str, seed: int, n: int, length: int) -> list[str]:
    if tool in ("lowbit", "lowbit-bf16"):
        return [
            str(REPO / ".venv" / "bin" / "lowbit"), "quantize", "--model", str(model_folder(model)),
            "--recipe", lowbit_recipe(method), "--nsamples", str(n), "--seq-len", str(length), "--seed", str(seed),
            "--out", str(out), "--overwrite", "--json",
            *(["--compute-dtype", "bfloat16"] if tool == "lowbit-bf16" else []),
        ]
    return [str(PYTHON[tool]), str(Path(__file__).parent / f"quantize_{tool}.py"), method, str(out),
            "--model", str(model_folder(model)), "--ids", str(ids_file(model, seed))]


def default_group(model: str) -> int:
    """The largest of 128, 64, 32 that divides every block Linear's input width (llm-compressor refuses a partial
    last group: SmolLM2's 576 columns take 64)."""
    config = json.loads((model_folder(model) / "config.json").read_text())
    config = config.get("text_config", config)
    try:
        widths = [config["hidden_size"], config["intermediate_size"]]
        heads = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        widths.append(heads * config["num_attention_heads"])
    except (KeyError, TypeError):
        sys.exit(f"{model}: its config.json does not name the Linear widths this check reads; pass --group-size")
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 32)


def run_measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes of the child and its waited-for descendants)."""
    start = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=WORK)  # GPTQModel logs to ./logs
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def evaluate(tool: str, folder: Path, ids: Path) -> dict:
    tool = "lowbit" if tool == "lowbit-bf16" else tool  # a lowbit output either way
    command = [str(PYTHON["lowbit" if tool == "fp32" else tool]), str(Path(__file__).parent / "evaluate.py"), tool,
               str(folder), "--ids", str(ids)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=WORK)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def tail(log: Path, lines: int = 3) -> str:
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def save(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, folder / "report.md")
    write_summary(RESULTS)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.system()}"


def load_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        sys.exit(f"{path} is corrupt ({exc.msg}); move it away to start afresh")


def check_inputs(results: dict, path: Path, seed: int, inputs: dict) -> None:
    """The results in ``path`` were measured on these inputs, or none yet for this seed."""
    known = results.setdefault("calibration_sha", {})
    if known.get(str(seed), inputs["calibration_sha"]) != inputs["calibration_sha"] or results.get(
            "evaluation_sha", inputs["evaluation_sha"]) != inputs["evaluation_sha"]:
        sys.exit(f"{path} was measured on other inputs; move it away to start afresh")
    known[str(seed)] = inputs["calibration_sha"]


def record(row: dict, seed: int, seconds: float, rss: int, out: Path, evaluated: dict) -> None:
    """One run into its row; the row's figures are the medians over its runs (perplexity: over the seeds)."""
    if "error" in evaluated:
        row["error"] = f"evaluation: {evaluated['error']}"
        return
    for key, value in (("seeds", seed), ("wall_seconds", round(seconds, 2)), ("peak_rss_bytes", rss),
                       ("perplexities", evaluated["perplexity"])):
        row.setdefault(key, []).append(value)
    row["date"] = f"{datetime.date.today()}"
    row["output_bytes"] = weight_bytes(out)
    row["zero_share"] = evaluated.get("zero_share")
    row["perplexity"] = statistics.median(row["perplexities"])
    row["median_wall_seconds"] = statistics.median(row["wall_seconds"])
    row["median_peak_rss_bytes"] = statistics.median(row["peak_rss_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"one of {', '.join(MODELS)}, a folder or a .gguf")
    parser.add_argument("--group-size", type=int, help="of the w4 methods (default: 128, or the largest of 64 "
                        "and 32 that divides every Linear's input width)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per calibration seed")
    parser.add_argument("--repeats", type=int, default=1, help="runs per seed, for timing (outputs are "
                        "deterministic: each seed's output is evaluated once)")
    parser.add_argument("--tools", nargs="+", default=list(SUPPORTED), choices=list(SUPPORTED))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--retry-failed", action="store_true", help="run again the rows that failed before")
    parser.add_argument("--again", action="store_true", help="drop the earlier runs of the selected tools and "
                        "methods and measure them again (after a change to what they run)")
    args = parser.parse_args()
    model = model_name(args.model)
    if not model_folder(model).is_dir():
        sys.exit(f"{model_folder(model)} is missing: run `.venv/bin/python bench/peers/prepare.py --model "
                 f"{args.model}` first")
    group = args.group_size or default_group(model)
    folder = RESULTS / f"{model}-g{group}"
    path = folder / "results.json"
    results = load_results(path)
    first = shared_inputs(model, args.seeds[0])
    n, length = first["calibration"].shape
    results.update({
        "model": model, "group_size": group, "machine": machine(), "calibration": [n, length],
        "evaluation": [first["evaluation"].shape[1] // first["window"], first["window"]],
        "evaluation_sha": results.get("evaluation_sha", first["evaluation_sha"]),
        "methods": [grouped(m, group) for m in METHODS],
    })
    results.setdefault("rows", {})
    if args.retry_failed:
        for rows in results["rows"].values():
            for method in [m for m, row in rows.items() if "error" in row]:
                del rows[method]
    if args.again:
        for tool in args.tools:
            for method in (grouped(m, group) for m in args.methods):
                results["rows"].get(tool, {}).pop(method, None)
    for seed in args.seeds:  # before anything is saved: the report names each seed's calibration
        check_inputs(results, path, seed, shared_inputs(model, seed))
    if "fp32" not in results:
        results["fp32"] = {**evaluate("fp32", model_folder(model), ids_file(model, args.seeds[0])),
                           "output_bytes": weight_bytes(model_folder(model))}
        save(results, folder)
    # Seed s of every row before seed s + 1 of any, and every seed before any repeat: a run cut short still has
    # every row measured once.
    for repeat, seed in ((r, s) for r in range(args.repeats) for s in args.seeds):
        for method in (grouped(m, group) for m in args.methods):
            for tool in args.tools:
                if method.replace(f"g{group}", "") not in SUPPORTED[tool]:
                    continue
                row = results["rows"].setdefault(tool, {}).setdefault(method, {})
                if row.get("seeds", []).count(seed) > repeat or "error" in row:
                    continue
                out = WORK / model / "outputs" / tool / method
                out.parent.mkdir(parents=True, exist_ok=True)
                log = out.parent / f"{method}.log"
                print(f"[{datetime.datetime.now():%H:%M:%S}] {model} {tool} {method} (seed {seed})", flush=True)
                command = quantize_command(tool, method, out, model, seed, n, length)
                status, seconds, rss = run_measured(command, log)
                if status != 0:
                    row["error"] = f"exit {status}: {tail(log)}"
                    print(f"  failed: {row['error']}", flush=True)
                    save(results, folder)
                    continue
                evaluated = (evaluate(tool, out, ids_file(model, seed)) if seed not in row.get("seeds", []) else
                             {"perplexity": row["perplexities"][row["seeds"].index(seed)], "zero_share": row["zero_share"]})
                record(row, seed, seconds, rss, out, evaluated)
                print(f"  {seconds:.1f}s, peak RSS {rss / 2**20:.0f} MiB, perplexity "
                      f"{row['perplexities'][-1] if 'error' not in row else row['error']}", flush=True)
                results["date"] = f"{datetime.date.today()}"
                save(results, folder)


if __name__ == "__main__":
    main()
