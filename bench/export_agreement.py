"""Logits agreement of an export (a GGUF file, a compressed-tensors folder) with lowbit's own loader, on held-out text.

    .venv/bin/python bench/export_agreement.py LOWBIT_DIR EXPORTED [--results FILE.json]

Both are evaluated on the same windows of the embedded evaluation text; prints (and writes) the largest absolute
logit difference relative to the largest logit (and the window position where it occurs), the share of positions
whose top-1 token agrees, and both perplexities.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.data.text import documents
from lowbit.evaluation.perplexity import evaluation_ids
from lowbit.models.embedded import DEFAULT_TEXT
from lowbit.models.open import open_model


def _open_export(path: Path) -> torch.nn.Module:
    """A compressed-tensors folder as transformers loads it (compressed-tensors decompresses it); a GGUF file as
    lowbit opens it (transformers' gguf_file= reader)."""
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return open_model(str(path)).model


def _bytes(path: Path) -> int:
    """A file's size, or the weight files of a folder."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lowbit_dir")
    parser.add_argument("exported")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--results", help="JSON file to write")
    args = parser.parse_args()
    ours, theirs = open_model(args.lowbit_dir), _open_export(Path(args.exported))
    ids = evaluation_ids(ours.tokenizer, documents(DEFAULT_TEXT, "evaluation"))[0, : args.windows * args.window]
    windows = ids.reshape(args.windows, args.window)  # [windows, window]
    worst, scale, nll = 0.0, 0.0, {"lowbit": 0.0, "exported": 0.0}
    worst_position, same_top1 = 0, 0
    with torch.no_grad():
        for w in windows:
            a = ours.model(w[None]).logits[0].float()  # [window, vocab]
            b = theirs(w[None]).logits[0].float()
            per_position = (a - b).abs().amax(dim=-1)  # [window]
            if float(per_position.max()) > worst:
                worst, worst_position = float(per_position.max()), int(per_position.argmax())
            scale = max(scale, float(a.abs().max()))
            same_top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
            for name, logits in (("lowbit", a), ("exported", b)):
                nll[name] += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
    tokens = args.windows * (args.window - 1)
    result = {
        "lowbit_dir": args.lowbit_dir, "exported": args.exported, "tokens": tokens,
        "max_abs_logit_diff": worst, "max_abs_logit": scale, "relative": worst / scale,
        "worst_position_in_window": worst_position, "top1_agreement": same_top1 / windows.numel(),
        "perplexity_lowbit": float(torch.exp(torch.tensor(nll["lowbit"] / tokens))),
        "perplexity_exported": float(torch.exp(torch.tensor(nll["exported"] / tokens))),
        "exported_bytes": _bytes(Path(args.exported)),
    }
    print(json.dumps(result, indent=2))
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
