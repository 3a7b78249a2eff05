"""Run in llama.cpp's own environment (bench/llamacpp/setup.sh), not lowbit's: next-token logits of a GGUF file for
given windows of token ids, and llama.cpp's own tokenization of a text, for bench/export_agreement.py.

    out/llamacpp/venv/bin/python bench/llamacpp/logits.py MODEL.gguf WINDOWS.npy LOGITS.npy [--text FILE]

WINDOWS.npy: int64 [windows, window]. LOGITS.npy: float32 [windows, window, vocab], each window evaluated from an
empty KV cache with no BOS added (the ids are used exactly as given). With --text, llama.cpp's token ids of that
file's text (no BOS) go to LOGITS.npy's sibling ``.tokens.npy``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("windows")
    parser.add_argument("logits")
    parser.add_argument("--text")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama_cpp is missing: run bench/llamacpp/setup.sh and use out/llamacpp/venv/bin/python", file=sys.stderr)
        return 1
    if not os.path.isfile(args.model):
        print(f"{args.model} is not a file", file=sys.stderr)
        return 1
    windows = np.load(args.windows)
    n_windows, window = windows.shape
    llm = Llama(model_path=args.model, n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    logits = np.empty((n_windows, window, llm.n_vocab()), dtype=np.float32)
    for i, ids in enumerate(windows):
        llm.reset()
        llm.eval([int(t) for t in ids])
        logits[i] = np.asarray(llm.scores[:window], dtype=np.float32)
    np.save(args.logits, logits)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            tokens = llm.tokenize(f.read().encode("utf-8"), add_bos=False, special=False)
        np.save(args.logits.removesuffix(".npy") + ".tokens.npy", np.asarray(tokens, dtype=np.int64))
    return 0


if __name__ == "__main__":
    sys.exit(main())
