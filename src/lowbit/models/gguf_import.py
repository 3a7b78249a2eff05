"""Convert a GGUF file once into a cached Hugging Face folder (float32 safetensors + config + tokenizer).

transformers dequantizes GGUF tensors on load but refuses ``save_pretrained`` on such a model, so the state dict
is written directly. The cache key is the file's sha256, so a changed file is never served stale; an entry is
reused only when its import record matches the file and its weights (see ``cache_entry_is_valid``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory
from lowbit.models.embedded import cache_dir, file_sha256

log = logging.getLogger(__name__)
IMPORT_RECORD = "lowbit_import.json"  # written last: which GGUF the entry came from and which tensors it holds


def import_gguf(path: Path, sha256: str | None = None) -> Path:
    """Return the cached HF folder for GGUF ``path``, converting it on first use (or when the cached entry does not
    validate: written by an older lowbit, edited, or truncated)."""
    digest = sha256 or file_sha256(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if cache_entry_is_valid(folder, digest):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a Hugging Face folder in %s (once)", path.name, folder)
    with atomic_directory(folder, overwrite=True, inputs=[path], wait=True) as tmp:
        tensors = _convert(path, tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps({"gguf_sha256": digest, "tensors": tensors}, indent=2))
    return folder


def cache_entry_is_valid(folder: Path, digest: str) -> bool:
    """The entry was converted from this very file, and its weights file holds exactly the tensors written."""
    try:
        record = json.loads((folder / IMPORT_RECORD).read_text())
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            names = sorted(handle.keys())
    except (OSError, ValueError, SafetensorError):
        return False
    return isinstance(record, dict) and record.get("gguf_sha256") == digest and record.get("tensors") == names


def _convert(path: Path, out: Path) -> list[str]:
    """Write the HF folder; returns the names of the tensors written."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        config = AutoConfig.from_pretrained(path.parent, trust_remote_code=False, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=torch.float32, output_loading_info=True, trust_remote_code=False, **kwargs
        )
    except Exception as exc:  # transformers/gguf raise many types for a bad file; all mean the same to the user
        raise LowbitError(
            f"cannot read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}; the file is corrupt, "
            "truncated, or of an architecture transformers cannot load"
        ) from None
    tied = "lm_head.weight" if getattr(config, "tie_word_embeddings", False) else None
    # transformers initialises a parameter the file lacks at random and goes on: lowbit would quantize noise
    invented = sorted(set(loading.get("missing_keys", ())) - {tied} | set(loading.get("mismatched_keys", ())))
    if invented:
        raise LowbitError(
            f"GGUF file {path} lacks {len(invented)} tensor(s) its architecture needs, e.g. {invented[0]!r} (renamed, "
            "missing or of the wrong shape); the file is corrupt or was written for another architecture"
        )
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    state.pop(tied, None)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise LowbitError(f"GGUF file {path}: tensor {name!r} has NaN or inf values; the file is corrupt")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sorted(state)
