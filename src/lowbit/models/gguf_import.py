"""Convert a GGUF file once into a cached Hugging Face folder (float32 safetensors + config + tokenizer).

transformers dequantizes GGUF tensors on load but refuses ``save_pretrained`` on such a model, so the state dict
is written directly. The cache key is the file's sha256, so a changed file is never served stale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory
from lowbit.models.embedded import cache_dir, file_sha256

log = logging.getLogger(__name__)


def import_gguf(path: Path, sha256: str | None = None) -> Path:
    """Return the cached HF folder for GGUF ``path``, converting it on first use."""
    digest = sha256 or file_sha256(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a Hugging Face folder in %s (once)", path.name, folder)
    with atomic_directory(folder, overwrite=True) as tmp:
        _convert(path, tmp)
    return folder


def _convert(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers/gguf raise many types for a bad file; all mean the same to the user
        raise LowbitError(
            f"cannot read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}; the file is corrupt, "
            "truncated, or of an architecture transformers cannot load"
        ) from None
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise LowbitError(f"GGUF file {path}: tensor {name!r} has NaN or inf values; the file is corrupt")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
