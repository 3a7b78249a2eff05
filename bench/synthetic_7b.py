"""A model larger than this machine's RAM, end to end: import a GGUF of Llama-2-7B's shape (bench/synthetic_gguf.py:
random Q4_K weights, 6.9B parameters, 27 GB in float32 against 24 GiB of RAM), then quantize it with RTN W4 g128
and GPTQ W4 g128, each step a fresh process that reports its own wall time and peak RSS.

Steps: the GGUF is written once (out/synthetic/); the import (bfloat16 cache, lowbit's default) runs alone first so
its cost is separate; each `lowbit quantize --json` then reads the cache block by block. GPTQ calibrates on
``--nsamples`` x ``--seq-len`` tokens (default 16 x 256: on 2 CPU cores a 7B block's forward passes dominate; the
point is memory and that it completes). Writes bench/results/synthetic_7b.json and prints a table.

    OMP_NUM_THREADS=2 .venv/bin/python bench/synthetic_7b.py [--nsamples 16 --seq-len 256] [--recipes w4g128,gptq-w4g128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "synthetic_7b.json"
WORK = ROOT / "out" / "synthetic"
GGUF = WORK / "llama2-7b-shape-q4_k.gguf"
IMPORT = """
import json, resource, sys, time
from pathlib import Path
start = time.perf_counter()
from lowbit.models.gguf_import import import_gguf
from lowbit.models.checkpoint import CheckpointReader
folder = import_gguf(Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cache_bytes": CheckpointReader(folder).nbytes()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", default="16")
    parser.add_argument("--seq-len", default="256")
    parser.add_argument("--recipes", default="w4g128,gptq-w4g128")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if not GGUF.exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_gguf.py"), str(GGUF)], check=True)
    done = subprocess.run([sys.executable, "-c", IMPORT, str(GGUF)], stdout=subprocess.PIPE, text=True, check=True)
    steps = {"import (bfloat16 cache)": json.loads(done.stdout.strip().splitlines()[-1])}
    print(f"import: {steps['import (bfloat16 cache)']}", flush=True)
    for recipe in args.recipes.split(","):
        out = WORK / f"q-{recipe}"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--model", str(GGUF), "--recipe", recipe,
             "--out", str(out), "--overwrite", "--json", "--nsamples", args.nsamples, "--seq-len", args.seq_len],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        summary = json.loads(done.stdout)
        steps[recipe] = {"seconds": summary["seconds"], "process_seconds": time.perf_counter() - start,
                         "peak_rss_bytes": summary["peak_rss_bytes"], "source_bytes": summary["source_bytes"],
                         "out_bytes": summary.get("out_bytes")}
        print(f"{recipe}: {steps[recipe]}", flush=True)
    from lowbit.evaluation.speed import machine_description

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_description(), "gguf_bytes": GGUF.stat().st_size,
                                   "calibration": f"{args.nsamples} x {args.seq_len} tokens", "steps": steps}, indent=2))
    gib = 2**30
    print("\n| step | wall | peak RSS |\n|---|---:|---:|")
    for name, step in steps.items():
        print(f"| {name} | {step['seconds']:,.0f} s | {step['peak_rss_bytes'] / gib:.2f} GiB |")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
