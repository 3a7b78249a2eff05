"""Write a lowbit checkpoint: one safetensors shard per decoder block (written as soon as the block is done) plus
one for everything else, an HF-style index, config.json, tokenizer files, lowbit_config.json, the per-layer
report and the transform artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.models.checkpoint import INDEX_FILE
from lowbit.runtime.registry import is_runtime_module, module_config

FORMAT_VERSION = 1
LOWBIT_CONFIG = "lowbit_config.json"  # its presence is what makes a folder a lowbit output
REPORT_FILE = "quant_report.json"
ARTIFACT_FILE = "transforms.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "tokenizer.gguf",  # a GGUF source's own tokenizer keys (models/gguf_tokenizer_fields.py)
)


class ShardWriter:
    """Accumulates the weight map while shards are written one by one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(tensors, str(self.folder / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            self.weight_map[name] = filename
            self.total_bytes += t.numel() * t.element_size()

    def write_module(self, filename: str, prefix: str, module: nn.Module) -> None:
        self.write(filename, {f"{prefix}.{k}": v for k, v in module.state_dict().items()})

    def finish(self) -> None:
        write_index(self.folder, self.weight_map, self.total_bytes)


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """The HF-style ``model.safetensors.index.json``: tensor -> shard file, and the tensors' total bytes."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def block_shard_name(prefix: str) -> str:
    return f"block-{int(prefix.rsplit('.', 1)[-1]):05d}.safetensors"


def runtime_module_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: module_config(m) for name, m in model.named_modules() if is_runtime_module(m)}


def write_metadata(
    folder: Path,
    config: Any,
    modules: dict[str, dict[str, Any]],
    recipe: dict[str, Any],
    dtype: torch.dtype,
    report: dict[str, Any] | None,
    artifact: dict[str, torch.Tensor],
    tokenizer_source: Path | None = None,
    tokenizer: Any = None,
    tied_head: dict[str, str] | None = None,
) -> None:
    config.save_pretrained(folder)
    lowbit_config: dict[str, Any] = {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "dtype": str(dtype).removeprefix("torch."),
        "recipe": recipe,
        "modules": modules,
    }
    if tied_head is not None:  # a quantized head that reads the quantized embedding's table (stored once)
        lowbit_config["tied_head"] = tied_head
    (folder / LOWBIT_CONFIG).write_text(json.dumps(lowbit_config, indent=2))
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if artifact:
        save_file({k: v.contiguous() for k, v in artifact.items()}, str(folder / ARTIFACT_FILE), metadata={"recipe": json.dumps(recipe)})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif tokenizer_source is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).exists():
                shutil.copy2(tokenizer_source / name, folder / name)
