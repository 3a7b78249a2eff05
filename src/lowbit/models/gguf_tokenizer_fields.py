"""A GGUF's own tokenizer, kept beside the Hugging Face folder lowbit imports it into, so that a GGUF export of a model
that came from a GGUF carries the very tokenizer llama.cpp ran it with.

transformers turns a GGUF tokenizer into a tokenizer.json, and that is lossy for the SentencePiece vocabularies
(``tokenizer.ggml.model == "llama"``: Gemma, Llama 2, Mistral): the scores llama.cpp merges by are gone, and token
types change (Gemma 3's runs of spaces are user-defined tokens in its GGUF and plain vocabulary in the tokenizer.json).
So the import also writes ``tokenizer.gguf``: a GGUF file with no tensors holding every ``tokenizer.*`` key of the
source, byte for byte, which lowbit outputs carry with their tokenizer files (io/writer.py TOKENIZER_FILES) and the GGUF
export copies where it cannot derive the keys from a byte-level BPE tokenizer.json (export/gguf.py gguf_tokenizer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

TOKENIZER_GGUF = "tokenizer.gguf"
_PREFIX = "tokenizer."
_ARCH = "tokenizer"  # GGUFWriter needs an architecture name; nothing reads this file as a model


def tokenizer_fields(reader: Any) -> list[tuple[str, Any, Any, Any]]:  # noqa: ANN401 (gguf's GGUFReader and values)
    """(key, value, value type, element type) of every ``tokenizer.*`` field of a GGUF ``reader``, in file order."""
    from gguf import GGUFValueType

    fields = []
    for key, field in reader.fields.items():
        if not key.startswith(_PREFIX):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields.append((key, field.contents(), vtype, sub))
    return fields


def write_tokenizer_gguf(reader: Any, folder: Path) -> bool:  # noqa: ANN401 (gguf's GGUFReader)
    """Write the source's tokenizer fields as ``folder/tokenizer.gguf``; False (nothing written) when it has none."""
    import gguf

    try:
        fields = tokenizer_fields(reader)
    except (UnicodeDecodeError, ValueError) as exc:  # a token gguf-py cannot read back: keep none (the export refuses)
        logging.getLogger(__name__).warning("not keeping the GGUF's own tokenizer keys: %s", str(exc)[:200])
        return False
    if not fields:
        return False
    chatty = logging.getLogger("gguf")  # its writer announces every file at INFO: an import detail, not the user's
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(str(folder / TOKENIZER_GGUF), _ARCH)
    try:
        add_fields(writer, fields)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
        chatty.setLevel(level)
    return True


def read_tokenizer_gguf(folder: Path) -> list[tuple[str, Any, Any, Any]] | None:
    """The tokenizer fields kept in ``folder/tokenizer.gguf``, or None when the folder has no such file."""
    path = folder / TOKENIZER_GGUF
    if not path.is_file():
        return None
    from gguf import GGUFReader

    try:
        return tokenizer_fields(GGUFReader(str(path)))
    except Exception as exc:  # gguf-py raises many types for a damaged file; all mean the same to the user
        raise LowbitError(f"cannot read {path} ({type(exc).__name__}: {str(exc)[:120]}); it is damaged: delete it, "
                          "and import the source GGUF again to write it anew") from None


def add_fields(writer: Any, fields: list[tuple[str, Any, Any, Any]]) -> None:  # noqa: ANN401 (gguf's GGUFWriter)
    """Add ``fields`` (``tokenizer_fields``) to a GGUF being written, each with its own value types."""
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
