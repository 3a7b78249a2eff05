"""Resolve what the user named (embedded name, .gguf file, HF folder, lowbit output) to a local HF folder.

lowbit works offline: anything that is not a local path or an embedded name fails at once with a message
saying so, before any network call could hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.io.writer import LOWBIT_CONFIG
from lowbit.models.embedded import EMBEDDED_MODELS
from lowbit.models.gguf_import import import_gguf


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    name: str
    is_lowbit: bool  # a lowbit output directory (packed weights), not a plain HF checkpoint


def resolve_model(spec: str) -> ModelSource:
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        return ModelSource(import_gguf(embedded.verified_path(), embedded.sha256), spec, False)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"{path} is a file but not a .gguf; pass a Hugging Face model folder or a .gguf file")
        return ModelSource(import_gguf(path), spec, False)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LowbitError(f"{path} has no config.json; pass a Hugging Face model folder (save_pretrained output)")
        return ModelSource(path, spec, (path / LOWBIT_CONFIG).exists())
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        raise LowbitError(
            f"{spec!r} is not a local path; lowbit works offline from local files: download it first "
            f"(e.g. `huggingface-cli download {spec} --local-dir DIR`) and pass DIR, or use the embedded "
            f"default {next(iter(EMBEDDED_MODELS))!r}"
        )
    known = ", ".join(EMBEDDED_MODELS)
    raise LowbitError(f"model path {spec!r} does not exist; pass a local folder, a .gguf file, or one of: {known}")
