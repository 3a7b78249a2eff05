"""Open any model lowbit accepts (embedded name, .gguf, HF folder, lowbit output) whole, for evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.checkpoint import CheckpointReader
from lowbit.models.lazy import LazyModel
from lowbit.models.source import ModelSource, resolve_model


@dataclass
class OpenedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    load_seconds: float  # building the model and reading its weights (a GGUF's one-time conversion excluded)
    disk_bytes: int  # safetensors bytes of the checkpoint


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise LowbitError(f"cannot load a tokenizer from {folder} ({str(exc)[:120]}); copy the tokenizer files there") from None


def open_model(
    spec: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", backend: str = "exact"
) -> OpenedModel:
    from lowbit.api import load

    source = resolve_model(spec)
    start = time.perf_counter()
    if source.is_lowbit:
        model = load(source.folder, dtype=dtype, device=device, backend=backend)
    else:
        lazy = LazyModel(source.folder, dtype or torch.float32)
        lazy.materialize("")
        model = lazy.model.to(device).eval()
    load_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(source.folder)
    return OpenedModel(model, tokenizer, source, load_seconds, CheckpointReader(source.folder).nbytes())
