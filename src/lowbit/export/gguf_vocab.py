"""Which tokenizer a GGUF export writes, and how: llama.cpp runs a file with the tokenizer keys inside it, so they
must tokenize as the model was trained to.

In order of preference:
  1. a byte-level BPE tokenizer.json (Llama 3, SmolLM2, Qwen, Phi-4): llama.cpp's ``gpt2`` vocabulary with the
     pre-tokenizer named from its structure (export/gguf_tokenizer.py). Kept first even where the source GGUF's own
     keys exist: it tokenizes as the Hugging Face tokenizer lowbit calibrated and evaluated with, which the original
     SmolLM2 GGUF's keys do not quite (2,133 vs 2,135 tokens of the evaluation text: docs/engines.md);
  2. a GGUF source's own keys, kept when lowbit imported it (tokenizer.gguf, models/gguf_tokenizer_fields.py),
     copied exactly: the only faithful record of a SentencePiece vocabulary that came as a GGUF;
  3. a SentencePiece tokenizer.model (Gemma, Llama 2, Phi-3-mini from a Hugging Face folder): llama.cpp's ``llama``
     vocabulary as its converter builds it (export/sentencepiece_vocab.py), the special ids, add_bos / add_eos and
     the chat template by gguf-py's own SpecialVocab;
otherwise the first one's refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.export.gguf_tokenizer import tokenizer_metadata
from lowbit.export.sentencepiece_vocab import SentencePieceVocab, json_object, sentencepiece_vocab
from lowbit.models.gguf_tokenizer_fields import add_fields, read_tokenizer_gguf


@dataclass(frozen=True)
class TokenizerKeys:
    """A tokenizer of ``count`` tokens that ``write(writer, config)`` adds to a GGUF being written."""

    count: int
    write: Callable[[Any, Any], None]


def gguf_tokenizer(folder: Path, rows: int, space_prefix: bool | None = None) -> TokenizerKeys:
    """The tokenizer keys for a model of ``folder`` whose embedding has ``rows`` rows. ``space_prefix``: what a
    SentencePiece vocabulary's ``add_space_prefix`` is for this family (None: llama.cpp's default, not written)."""
    try:
        bpe = tokenizer_metadata(folder, rows)
    except LowbitError:
        kept = read_tokenizer_gguf(folder)
        if kept is not None:
            count = next((len(v) for k, v, _, _ in kept if k == "tokenizer.ggml.tokens"), 0)
            return TokenizerKeys(count, lambda writer, _config: add_fields(writer, kept))
        if not (folder / "tokenizer.model").is_file():
            raise
        vocab = sentencepiece_vocab(folder, rows)
        return TokenizerKeys(len(vocab.tokens), partial(_write_sentencepiece, vocab, folder, space_prefix))
    return TokenizerKeys(len(bpe["tokens"]), partial(_write_bpe, bpe))


def check_vocabulary(tokenizer: TokenizerKeys, rows: int) -> None:
    """llama.cpp sizes token_embd by the tokenizer's token list: refuse an embedding of another size."""
    if tokenizer.count != rows:
        raise LowbitError(f"the tokenizer has {tokenizer.count} tokens and the embedding {rows} rows, which llama.cpp "
                          "refuses; export compressed-tensors, or give the model a tokenizer of its embedding's size")


def _write_bpe(bpe: dict[str, Any], writer: Any, config: Any) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe["pre"])
    writer.add_token_list(bpe["tokens"])
    writer.add_token_types(bpe["token_types"])
    if bpe["merges"]:
        writer.add_token_merges(bpe["merges"])
    else:  # a byte vocabulary without merges (GGUF readers then expect scores to derive them from)
        writer.add_token_scores([0.0] * len(bpe["tokens"]))
    writer.add_add_bos_token(bpe["add_bos"])
    for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("pad", config.pad_token_id)):
        if isinstance(value, int):
            getattr(writer, f"add_{key}_token_id")(value)


def _write_sentencepiece(vocab: SentencePieceVocab, folder: Path, space_prefix: bool | None, writer: Any,
                         _config: Any) -> None:
    """The "llama" vocabulary; ``space_prefix``: the family's add_space_prefix (Gemma: false), else the folder's."""
    import gguf

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    gguf.SpecialVocab(folder, n_vocab=len(vocab.tokens)).add_to_gguf(writer, quiet=True)
    if space_prefix is None:  # llama.cpp's converter: tokenizer_config.json's add_prefix_space, where it is set
        stated = json_object(folder / "tokenizer_config.json").get("add_prefix_space")
        space_prefix = stated if isinstance(stated, bool) else None
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
