"""What quantizing inputs costs at evaluation: each lowbit output's forward time over its float model's, measured in
one process with the two interleaved (float, output, float, output, ...), so the machine's drift lands on both
(fresh-process tokens/s, bench/eval_speed.py, moved by 20% between identical runs on this shared machine).
Reported: the median over rounds of (output forward / the float forward just before it); dequantized backend.

The outputs are bench/eval_speed.py's (quantized by it into out/bench/eval_speed/ when missing). Forwards: the
embedded SmolLM2-135M on 1 x 1024 tokens, the random Llama of hidden size 768 on 8 x 256. Writes --out
(default bench/results/eval_overhead.json) with the commit of the lowbit code measured; another checkout's code
(the commit before a change) through PYTHONPATH:

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_overhead.py [--rounds 5] [--out FILE]
    git worktree add /tmp/before REV && PYTHONPATH=/tmp/before/src OMP_NUM_THREADS=2 .venv/bin/python \
        bench/eval_overhead.py --out bench/results/eval_overhead-REV.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ is sys.path[0] when this runs as a script, and bench/kernels.py would shadow the `kernels` package that
# transformers probes for at import: take it out before torch and transformers are imported
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
_spec = importlib.util.spec_from_file_location("eval_speed", ROOT / "bench" / "eval_speed.py")
eval_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_speed)  # its outputs, recipe lists and random Llama

MODELS = {"smollm2-135m": ("smollm2-135m", (1, 1024)), "random llama h768": (None, (8, 256))}
RECIPES = ("w4g128", *eval_speed.INPUT_QUANTIZING)


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_overhead.json")
    args = parser.parse_args()
    from lowbit.evaluation.evaluate import open_model
    from lowbit.evaluation.speed import machine_description

    eval_speed.WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (spec, shape) in MODELS.items():
        spec = spec or str(eval_speed.random_llama(eval_speed.WORK / "llama-h768"))
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0))
        float_model = open_model(spec, None, "cpu", "exact").model
        forward_seconds(float_model, ids)  # warm-up
        for recipe in RECIPES:
            model = open_model(str(eval_speed.output(label, spec, recipe)), None, "cpu", "dequantized").model
            forward_seconds(model, ids)
            ratios, seconds = [], []
            for _ in range(args.rounds):
                base = forward_seconds(float_model, ids)
                seconds.append(forward_seconds(model, ids))
                ratios.append(seconds[-1] / base)
            rows.append({"model": label, "recipe": recipe, "tokens": ids.numel(), "ratio": statistics.median(ratios),
                         "ratios": ratios, "seconds": statistics.median(seconds)})
            print(f"{label:18s} {recipe:12s} forward {statistics.median(seconds):.3f} s  "
                  f"{statistics.median(ratios):.3f}x the float forward ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)
            del model
            gc.collect()
    code = Path(sys.modules["lowbit"].__file__).parent  # PYTHONPATH may point at another checkout's src/
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    args.out.write_text(json.dumps({"machine": machine_description(), "commit": commit.stdout.strip(),
                                    "lowbit": str(code),
                                    "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
