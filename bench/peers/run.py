"""lowbit next to llm-compressor and GPTQModel on the embedded SmolLM2-135M: the same float32 input folder, the
same calibration token ids, the same evaluation windows, and one evaluator (lowbit's perplexity function) for every
tool's output, each loaded the way that tool's users load it.

Every (tool, method) is quantized --repeats times in a fresh process; its wall time (process start to exit, model
load and save included) and peak RSS (the child's own, from wait4) are recorded each time and reported as medians.
The output of the last repeat is evaluated once. Results accumulate in bench/results/peers/results.json, so an
interrupted run resumes where it stopped; report.md is rewritten after every step.

  usage: bench/peers/setup.sh && .venv/bin/python bench/peers/prepare.py && .venv/bin/python bench/peers/run.py
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

from report import write_report
from shared import MODEL, REPO, WORK, shared_inputs

RESULTS = REPO / "bench" / "results" / "peers"
OUTPUTS = WORK / "outputs"
PYTHON = {
    "lowbit": REPO / ".venv" / "bin" / "python",
    "lowbit-bf16": REPO / ".venv" / "bin" / "python",
    "llmcompressor": WORK / "venvs" / "llmcompressor" / "bin" / "python",
    "gptqmodel": WORK / "venvs" / "gptqmodel" / "bin" / "python",
}
METHODS = (
    "rtn-w4g64", "gptq-w4g64", "gptq-w4g64-actorder", "awq-w4g64", "smoothquant-w8a8", "wanda-50", "wanda-2of4",
    "sparsegpt-50",
)
LOWBIT_RECIPE = {"rtn-w4g64": "w4g64"}  # otherwise the method name is lowbit's recipe name
SUPPORTED = {
    "lowbit": METHODS,
    # the same, with the calibration forwards in bfloat16 (--compute-dtype; RTN has none)
    "lowbit-bf16": tuple(m for m in METHODS if m != "rtn-w4g64"),
    "llmcompressor": METHODS,
    "gptqmodel": ("gptq-w4g64", "gptq-w4g64-actorder"),
}


def quantize_command(tool: str, method: str, out: Path, n: int, length: int) -> list[str]:
    if tool in ("lowbit", "lowbit-bf16"):
        return [
            str(REPO / ".venv" / "bin" / "lowbit"), "quantize", "--model", str(MODEL),
            "--recipe", LOWBIT_RECIPE.get(method, method), "--nsamples", str(n), "--seq-len", str(length),
            "--out", str(out), "--overwrite", "--json",
            *(["--compute-dtype", "bfloat16"] if tool == "lowbit-bf16" else []),
        ]
    return [str(PYTHON[tool]), str(Path(__file__).parent / f"quantize_{tool}.py"), method, str(out)]


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


def evaluate(tool: str, folder: Path | None) -> dict:
    tool = "lowbit" if tool == "lowbit-bf16" else tool  # a lowbit output either way
    command = [str(PYTHON["lowbit" if tool == "fp32" else tool]), str(Path(__file__).parent / "evaluate.py"), tool]
    command += [str(folder)] if folder is not None else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=WORK)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def tail(log: Path, lines: int = 3) -> str:
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, RESULTS / "report.md")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tools", nargs="+", default=list(SUPPORTED), choices=list(SUPPORTED))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--retry-failed", action="store_true", help="run again the rows that failed before")
    args = parser.parse_args()
    inputs = shared_inputs()
    n, length = inputs["calibration"].shape
    path = RESULTS / "results.json"
    try:
        results = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        sys.exit(f"{path} is corrupt ({exc.msg}); move it away to start afresh")
    if results.get("calibration_sha") not in (None, inputs["calibration_sha"]) or results.get(
            "evaluation_sha") not in (None, inputs["evaluation_sha"]):
        sys.exit(f"{path} was measured on other inputs; move it away to start afresh")
    results.update({
        "machine": machine(), "calibration": [n, length], "calibration_sha": inputs["calibration_sha"],
        "evaluation": [inputs["evaluation"].shape[1] // inputs["window"], inputs["window"]],
        "evaluation_sha": inputs["evaluation_sha"], "methods": list(METHODS),
    })
    results.setdefault("rows", {})
    if args.retry_failed:
        for rows in results["rows"].values():
            for method in [m for m, row in rows.items() if "error" in row]:
                del rows[method]
    if "fp32" not in results:
        results["fp32"] = {**evaluate("fp32", None), "output_bytes": weight_bytes(MODEL)}
        save(results)
    # Repeat r of every row before repeat r + 1 of any: a run cut short still has every row measured once.
    for repeat in range(args.repeats):
        for method in args.methods:
            for tool in args.tools:
                if method not in SUPPORTED[tool]:
                    continue
                row = results["rows"].setdefault(tool, {}).setdefault(method, {"wall_seconds": [], "peak_rss_bytes": []})
                if len(row["wall_seconds"]) > repeat or "error" in row:
                    continue
                out = OUTPUTS / tool / method
                out.parent.mkdir(parents=True, exist_ok=True)
                log = out.parent / f"{method}.log"
                print(f"[{datetime.datetime.now():%H:%M:%S}] {tool} {method} (repeat {repeat + 1})", flush=True)
                status, seconds, rss = run_measured(quantize_command(tool, method, out, n, length), log)
                if status != 0:
                    row["error"] = f"exit {status}: {tail(log)}"
                    print(f"  failed: {row['error']}", flush=True)
                    save(results)
                    continue
                row["wall_seconds"].append(round(seconds, 2))
                row["date"] = f"{datetime.date.today()}"
                row["peak_rss_bytes"].append(rss)
                row["output_bytes"] = weight_bytes(out)
                if "perplexity" not in row:
                    row.update({k: v for k, v in evaluate(tool, out).items() if k in ("perplexity", "zero_share", "error")})
                print(f"  {seconds:.1f}s, peak RSS {rss / 2**20:.0f} MiB, perplexity {row.get('perplexity')}", flush=True)
                row["median_wall_seconds"] = statistics.median(row["wall_seconds"])
                row["median_peak_rss_bytes"] = statistics.median(row["peak_rss_bytes"])
                results["date"] = f"{datetime.date.today()}"
                save(results)


if __name__ == "__main__":
    main()
