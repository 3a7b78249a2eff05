"""A model folder's tokenizer, through transformers, from local files only."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise LowbitError(f"cannot load a tokenizer from {folder} ({str(exc)[:120]}); copy the tokenizer files there") from None
