"""The shared inputs of the peer benchmark, written once by lowbit's environment into out/peers/:

- model/: the embedded SmolLM2-135M as a plain float32 Hugging Face folder (dequantized from its GGUF), the one
  input every tool quantizes;
- ids.pt: {"calibration": LongTensor [N, L], "evaluation": LongTensor [1, W * window], ...}: the calibration
  sequences are exactly those `lowbit quantize --nsamples N --seq-len L --seed 0` draws (same function, same text,
  same seed), and every tool gets them as token ids, so no tool re-tokenizes or re-samples anything.

  usage: python bench/peers/prepare.py --nsamples 16 --seq-len 512 --windows 16
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

import torch

from lowbit.data.calibration import calibration_ids
from lowbit.data.text import documents
from lowbit.evaluation.perplexity import evaluation_ids
from lowbit.models.tokenizer import load_tokenizer
from lowbit.models.source import resolve_model

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

ROOT = Path(__file__).resolve().parents[2] / "out" / "peers"


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--window", type=int, default=2048, help="tokens per evaluation window")
    args = parser.parse_args()

    source = resolve_model("smollm2-135m").folder
    model_dir = ROOT / "model"
    if not model_dir.is_dir():  # a finished copy (the rename below is its last step), sharded or not
        tmp = ROOT / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        tmp.rename(model_dir)
    tokenizer = load_tokenizer(source)
    calibration = calibration_ids(tokenizer, documents("wiki", "calibration"), args.nsamples, args.seq_len, seed=0)
    evaluation = evaluation_ids(tokenizer, documents("wiki", "evaluation"))[:, : args.windows * args.window]
    if evaluation.shape[1] < args.windows * args.window:
        raise SystemExit(f"the evaluation text holds fewer than {args.windows} windows of {args.window} tokens")
    info = {
        "calibration": calibration, "evaluation": evaluation, "window": args.window,
        "calibration_sha": digest(calibration), "evaluation_sha": digest(evaluation),
    }
    torch.save(info, ROOT / "ids.pt")
    print(f"{model_dir}: float32 SmolLM2-135M; calibration {tuple(calibration.shape)} sha {info['calibration_sha']}, "
          f"evaluation {args.windows} x {args.window} sha {info['evaluation_sha']}")


if __name__ == "__main__":
    main()
