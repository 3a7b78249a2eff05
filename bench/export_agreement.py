"""Logits agreement of an export (a GGUF file, a compressed-tensors folder) with lowbit's own loader, on held-out text.

    .venv/bin/python bench/export_agreement.py LOWBIT_DIR EXPORTED [--reader transformers|llama.cpp] [--results FILE.json]
        [--dtype float32|bfloat16]

Both are evaluated on the same windows of the embedded evaluation text; prints (and writes) the largest absolute
logit difference relative to the largest logit (and the window position where it occurs), the share of positions
whose top-1 token agrees, and both perplexities. The reader is transformers (compressed-tensors folders, or GGUF
through ``gguf_file=``) or, for a GGUF file, llama.cpp itself (bench/llamacpp/setup.sh builds it in its own
environment; bench/llamacpp/logits.py runs there), which also tokenizes the evaluation text with the tokenizer
lowbit wrote into the file, compared token for token with the Hugging Face tokenizer. ``--dtype bfloat16`` opens both
sides in bfloat16: transformers + compressed-tensors 0.20 decompress NVFP4 and MXFP4 in bfloat16 only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowbit.data.text import documents
from lowbit.evaluation.perplexity import evaluation_ids
from lowbit.data.text import DEFAULT_TEXT
from lowbit.api import open_model

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)


def _open_export(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A compressed-tensors folder as transformers loads it (compressed-tensors decompresses it); a GGUF file as
    lowbit opens it (transformers' gguf_file= reader)."""
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return open_model(str(path)).model


LLAMACPP_PYTHON = Path(__file__).resolve().parents[1] / "out" / "llamacpp" / "venv" / "bin" / "python"
LLAMACPP_LOGITS = Path(__file__).parent / "llamacpp" / "logits.py"


def _llamacpp_reader(gguf: Path, windows: torch.Tensor, text: str, tokenizer) -> tuple[Callable[[int], torch.Tensor], dict]:
    """All windows' logits from llama.cpp in one child process, plus its tokenization of ``text`` against ours."""
    if not LLAMACPP_PYTHON.exists():
        raise SystemExit(f"{LLAMACPP_PYTHON} is missing: run bench/llamacpp/setup.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        ids, logits, text_file = Path(tmp, "ids.npy"), Path(tmp, "logits.npy"), Path(tmp, "text.txt")
        np.save(ids, windows.numpy())
        text_file.write_text(text, encoding="utf-8")
        child = subprocess.run([str(LLAMACPP_PYTHON), str(LLAMACPP_LOGITS), str(gguf), str(ids), str(logits),
                                "--text", str(text_file)])
        if child.returncode != 0:
            raise SystemExit(f"llama.cpp could not evaluate {gguf} (exit {child.returncode}); its message is above")
        all_logits = torch.from_numpy(np.load(logits))  # [windows, window, vocab]
        theirs = np.load(Path(tmp, "logits.tokens.npy")).tolist()
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    same = sum(a == b for a, b in zip(ours, theirs))
    tokens = {"tokenizer_text_chars": len(text), "tokens_hf": len(ours), "tokens_llamacpp": len(theirs),
              "tokenization_identical": ours == theirs, "tokenization_same_prefix_share": same / max(len(ours), 1)}
    return lambda i: all_logits[i], tokens


def _bytes(path: Path) -> int:
    """A file's size, or the weight files of a folder."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lowbit_dir")
    parser.add_argument("exported")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--reader", choices=("transformers", "llama.cpp"), default="transformers")
    parser.add_argument("--results", help="JSON file to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if not Path(args.exported).exists():
        raise SystemExit(f"{args.exported} does not exist; export it first (`lowbit export`)")
    if args.reader == "llama.cpp" and not Path(args.exported).is_file():
        raise SystemExit(f"{args.exported} is not a GGUF file; llama.cpp reads GGUF exports only")
    dtype = getattr(torch, args.dtype)
    ours = open_model(args.lowbit_dir, dtype=dtype)
    texts = documents(DEFAULT_TEXT, "evaluation")
    ids = evaluation_ids(ours.tokenizer, texts)[0, : args.windows * args.window]
    windows = ids.reshape(args.windows, args.window)  # [windows, window]
    extra: dict = {}
    if args.reader == "llama.cpp":
        reader, extra = _llamacpp_reader(Path(args.exported), windows, "\n\n".join(texts[:20]), ours.tokenizer)
    else:
        exported = _open_export(Path(args.exported), dtype)
        reader = lambda i: exported(windows[i][None]).logits[0]  # noqa: E731
    worst, scale, nll = 0.0, 0.0, {"lowbit": 0.0, "exported": 0.0}
    worst_position, same_top1 = 0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            a = ours.model(w[None]).logits[0].float()  # [window, vocab]
            b = reader(i).float()
            per_position = (a - b).abs().amax(dim=-1)  # [window]
            if float(per_position.max()) > worst:
                worst, worst_position = float(per_position.max()), int(per_position.argmax())
            scale = max(scale, float(a.abs().max()))
            same_top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
            for name, logits in (("lowbit", a), ("exported", b)):
                nll[name] += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
    tokens = args.windows * (args.window - 1)
    result = {
        "lowbit_dir": args.lowbit_dir, "exported": args.exported, "reader": args.reader, "dtype": args.dtype,
        "tokens": tokens,
        "max_abs_logit_diff": worst, "max_abs_logit": scale, "relative": worst / scale,
        "worst_position_in_window": worst_position, "top1_agreement": same_top1 / windows.numel(),
        "perplexity_lowbit": float(torch.exp(torch.tensor(nll["lowbit"] / tokens))),
        "perplexity_exported": float(torch.exp(torch.tensor(nll["exported"] / tokens))),
        "exported_bytes": _bytes(Path(args.exported)),
        **extra,
    }
    print(json.dumps(result, indent=2))
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
