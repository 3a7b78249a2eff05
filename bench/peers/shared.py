"""What every peer-benchmark script shares, in any of the three environments (needs only the stdlib and torch):
where the shared inputs live, and lowbit's own perplexity function, imported from the source tree without
importing the rest of lowbit (whose dependencies a peer's environment does not have)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path

import torch

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "out" / "peers"
MODEL = WORK / "model"  # the float32 input every tool quantizes
IDS = WORK / "ids.pt"  # calibration and evaluation token ids (bench/peers/prepare.py)


def shared_inputs() -> dict:
    if not IDS.exists():
        raise SystemExit(f"{IDS} is missing: run `.venv/bin/python bench/peers/prepare.py` first")
    try:
        return torch.load(IDS)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise SystemExit(f"{IDS} is unreadable ({str(exc)[:80]}); run bench/peers/prepare.py again") from None


def lowbit_perplexity():
    """lowbit.evaluation.perplexity.perplexity, the one evaluator all tools' outputs go through."""
    if "lowbit" not in sys.modules:
        try:
            importlib.import_module("lowbit")  # lowbit's own environment
        except ImportError:
            package = types.ModuleType("lowbit")  # a peer's environment: the package without its __init__
            package.__path__ = [str(REPO / "src" / "lowbit")]
            sys.modules["lowbit"] = package
    from lowbit.evaluation.perplexity import perplexity

    return perplexity


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
