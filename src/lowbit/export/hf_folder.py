"""The Hugging Face checkpoint folder every folder exporter writes (compressed-tensors, GPTQ): one safetensors file,
the lowbit output's config.json with the export's ``quantization_config``, and the tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lowbit.io.atomic import atomic_directory
from lowbit.io.writer import TOKENIZER_FILES
from lowbit.models.gguf_tokenizer_fields import TOKENIZER_GGUF


def write_hf_folder(
    folder: Path, out: Path, overwrite: bool, state: dict[str, torch.Tensor],
    quantization_config: dict[str, Any] | None, extra_json: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``out`` atomically from lowbit output ``folder``: model.safetensors holding ``state``, config.json with
    ``quantization_config`` (none when it is None: a plain checkpoint), each of ``extra_json`` (file name -> content),
    and the tokenizer files lowbit's own output keeps (vocab.json, merges.txt, ...)."""
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with atomic_directory(out, overwrite, inputs=[folder]) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        for name in TOKENIZER_FILES:
            if (folder / name).exists() and name != TOKENIZER_GGUF:  # lowbit's own GGUF export reads that one
                shutil.copy(folder / name, tmp / name)
