"""What every peer-benchmark script shares, in any of the three environments (needs only the stdlib and torch):
which models the benchmark knows, where each model's shared inputs live, and lowbit's own perplexity function,
imported from the source tree without importing the rest of lowbit (whose dependencies a peer's environment does
not have)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import types
from pathlib import Path

import torch

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "out" / "peers"
REAL = REPO / "out" / "realmodels"  # the real GGUF files bench/real_models.sh fetches (FETCH_ONLY=1) and checks
# name -> what lowbit's --model takes; any other --model (a folder or a .gguf) is named after its file or folder
MODELS = {
    "smollm2-135m": "smollm2-135m",  # llama, the embedded default
    "gemma3-270m": str(REAL / "gemma-3-270m-q4_k_m.gguf"),  # gemma3
    "qwen2.5-coder-0.5b": str(REAL / "qwen2.5-coder-0.5b-instruct.gguf"),  # qwen2
}


def model_name(spec: str) -> str:
    return spec if spec in MODELS else Path(spec).name.removesuffix(".gguf").lower()


def model_folder(name: str) -> Path:
    """The float32 Hugging Face folder every tool quantizes (bench/peers/prepare.py writes it)."""
    return WORK / name / "model"


def ids_file(name: str, seed: int) -> Path:
    """Calibration ids drawn with this seed, and the evaluation ids (the same for every seed)."""
    return WORK / name / f"ids-seed{seed}.pt"


def read_ids(path: Path) -> dict:
    """A bench/peers/prepare.py ids file, or one line naming the fix if it is missing or unreadable."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `.venv/bin/python bench/peers/prepare.py --model M --seeds S` "
                         "for its model and seed first")
    try:
        return torch.load(path)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise SystemExit(f"{path} is unreadable ({str(exc)[:80]}); run bench/peers/prepare.py again") from None


def shared_inputs(name: str, seed: int) -> dict:
    return read_ids(ids_file(name, seed))


def group_of(method: str) -> int | None:
    """The group size a method name carries ("gptq-w4g128-actorder" -> 128), None for per-channel methods."""
    found = re.search(r"-w4g(\d+)", method)
    return int(found.group(1)) if found else None


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


def swap_for_float_linear(model: torch.nn.Module, name: str, weight: torch.Tensor) -> None:
    """Replace module ``name`` (a quantized Linear of any tool) by an nn.Linear holding ``weight`` [out, in] and the
    module's bias, both in float32."""
    module = model.get_submodule(name)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    linear.weight.data = weight.float().contiguous()
    if module.bias is not None:
        linear.bias.data = module.bias.float()
    model.set_submodule(name, linear)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
