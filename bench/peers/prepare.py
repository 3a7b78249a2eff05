"""The shared inputs of the peer benchmark for one model, written by lowbit's environment into out/peers/<model>/:

- model/: the model as a plain float32 Hugging Face folder (a GGUF is dequantized exactly, as lowbit imports it),
  the one input every tool quantizes;
- ids-seed<S>.pt, one per calibration seed: {"calibration": LongTensor [N, L], "evaluation": LongTensor
  [1, W * window], ...}: the calibration sequences are exactly those `lowbit quantize --nsamples N --seq-len L
  --seed S` draws (same function, same text, same seed), and every tool gets them as token ids, so no tool
  re-tokenizes or re-samples anything. The evaluation windows are the same for every seed.

  usage: python bench/peers/prepare.py [--model smollm2-135m|gemma3-270m|qwen2.5-coder-0.5b|DIR|FILE.gguf]
             [--seeds 0 1 2] [--nsamples 16 --seq-len 512 --windows 8 --window 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil

import torch

from shared import MODELS, WORK, ids_file, model_folder, model_name

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)
os.environ.setdefault("LOWBIT_CACHE", str(WORK.parent / "realmodels" / "cache"))  # one import per GGUF, shared

from lowbit.data.calibration import calibration_ids  # noqa: E402 (after the environment it reads)
from lowbit.data.text import documents  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.evaluation.perplexity import evaluation_ids  # noqa: E402
from lowbit.models.source import resolve_model  # noqa: E402
from lowbit.models.tokenizer import load_tokenizer  # noqa: E402


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"one of {', '.join(MODELS)}, a folder or a .gguf")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--window", type=int, default=2048, help="tokens per evaluation window")
    args = parser.parse_args()

    name = model_name(args.model)
    try:
        source = resolve_model(MODELS.get(args.model, args.model)).folder
    except LowbitError as exc:
        raise SystemExit(f"prepare: {exc}") from None
    model_dir = model_folder(name)
    if not model_dir.is_dir():  # a finished copy (the rename below is its last step), sharded or not
        tmp = model_dir.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        tmp.rename(model_dir)
    tokenizer = load_tokenizer(source)
    evaluation = evaluation_ids(tokenizer, documents("wiki", "evaluation"))[:, : args.windows * args.window]
    if evaluation.shape[1] < args.windows * args.window:
        raise SystemExit(f"the evaluation text holds fewer than {args.windows} windows of {args.window} tokens")
    for seed in args.seeds:
        calibration = calibration_ids(tokenizer, documents("wiki", "calibration"), args.nsamples, args.seq_len,
                                      seed=seed)
        info = {
            "calibration": calibration, "evaluation": evaluation, "window": args.window, "seed": seed,
            "calibration_sha": digest(calibration), "evaluation_sha": digest(evaluation),
        }
        torch.save(info, ids_file(name, seed))
        print(f"{model_dir}: float32 {name}; seed {seed}: calibration {tuple(calibration.shape)} sha "
              f"{info['calibration_sha']}, evaluation {args.windows} x {args.window} sha {info['evaluation_sha']}")


if __name__ == "__main__":
    main()
