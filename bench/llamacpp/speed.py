"""Run in llama.cpp's own environment (bench/llamacpp/setup.sh): prefill and decode speed of GGUF files in
llama.cpp, measured the way `lowbit bench` measures lowbit's runtime, so the two can sit in one table.

    out/llamacpp/venv/bin/python bench/llamacpp/speed.py MODEL.gguf [MODEL.gguf ...] [--results FILE.json]

Prefill: one evaluation of 512 random token ids from an empty cache. Decode at batch 1: the time of 16 more
single-token evaluations after a 1-token prompt, per token (greedy sampling is not timed: the next id is fixed).
Medians of 3; all cores (llama.cpp's default thread count is the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)


def measure(path: str, prefill: int, new_tokens: int, repeats: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=max(prefill, new_tokens + 1), n_batch=prefill, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, llm.n_vocab(), prefill)]
    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first round warms caches and is not counted
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill_s.append(time.perf_counter() - start)
        llm.reset()
        llm.eval(ids[:1])
        start = time.perf_counter()
        for t in ids[1 : new_tokens + 1]:
            llm.eval([t])
        decode_s.append(time.perf_counter() - start)
    return {
        "model": path, "bytes": os.path.getsize(path), "threads": threads,
        "prefill_tokens_per_s": prefill / statistics.median(prefill_s[1:]),
        "decode_b1_tokens_per_s": new_tokens / statistics.median(decode_s[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results")
    args = parser.parse_args()
    missing = [m for m in args.models if not os.path.isfile(m)]
    if missing:
        print(f"not a file: {', '.join(missing)}", file=sys.stderr)
        return 1
    rows = [measure(m, args.prefill_tokens, args.new_tokens, args.repeats, args.threads) for m in args.models]
    print(json.dumps(rows, indent=2))
    if args.results:
        with open(args.results, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
