"""A SentencePiece vocabulary (tokenizer.model: Gemma, Llama 2, Mistral v0.1, Phi-3-mini) as GGUF tokenizer keys, built
as llama.cpp's converter builds them (convert_hf_to_gguf.py ``_create_vocab_sentencepiece``; its Phi-3 variant differs
only for added tokens that are not marked special, which Phi-3-mini does not have), without the sentencepiece package.

tokenizer.model is a protobuf ModelProto: field 1 repeats the pieces (each: 1 the piece text, 2 its score, 3 its
type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte; llama.cpp's token types use the same
numbers). llama.cpp's rules on top of the pieces:
  * the token list has the model's vocab_size entries (the embedding's rows); ids no piece has are ``[PAD<id>]``,
    score -10000, unused;
  * a piece keeps its score; its type is unknown, control, unused or byte where SentencePiece says so, else normal
    (a user-defined piece becomes normal);
  * added_tokens.json's tokens are user-defined, and tokenizer_config.json's ``added_tokens_decoder`` ones control
    when marked special or when they look special (``<pad>``, ``<mask>``, ``<|...|>``, ``<unused...>`` ...), else
    user-defined with "▁" written as a space; both with score -1000.
One step beyond the converter: a folder saved by transformers 5 has no ``added_tokens_decoder`` (its added tokens are
in tokenizer.json), where the converter would leave chat markers such as Gemma's ``<start_of_turn>`` normal, and
llama.cpp would then split them into pieces; tokenizer.json's added tokens get the same rule, for ids nothing above
has typed other than normal or unused.
The special token ids, add_bos / add_eos and the chat template come from gguf-py's own SpecialVocab (export/gguf.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_KEPT_TYPES = (UNKNOWN, CONTROL, UNUSED, BYTE)  # the types llama.cpp's converter asks SentencePiece about
_SPACE = "\u2581"


@dataclass(frozen=True)
class SentencePieceVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The (field, wire type, value) of a protobuf message: an int for varints, bytes for length-delimited fields and
    the raw 4 / 8 bytes of fixed-width ones."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, at = _varint(data, at)
            else:
                size = 8 if wire == 1 else 4
            if at + size > len(data):  # a slice would come back short: a truncated file, not a shorter message
                raise ValueError(f"a field of {size} bytes runs past the end ({len(data)} bytes): the file is truncated")
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield field, wire, value


def read_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of SentencePiece model file ``path``, in id order."""
    try:
        pieces = []
        for field, wire, value in _fields(path.read_bytes()):
            if field != 1 or wire != 2:
                continue
            piece, score, kind = "", 0.0, NORMAL
            for sub, sub_wire, sub_value in _fields(value):
                if sub == 1 and sub_wire == 2:
                    piece = sub_value.decode("utf-8")
                elif sub == 2 and sub_wire == 5:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3 and sub_wire == 0:
                    kind = sub_value
            pieces.append((piece, score, kind))
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise LowbitError(f"cannot read {path} as a SentencePiece model ({exc}); GGUF export needs the model's own "
                          "tokenizer.model") from None
    if not pieces:
        raise LowbitError(f"{path} holds no SentencePiece pieces; GGUF export needs the model's own tokenizer.model")
    return pieces


def looks_special(token: str) -> bool:
    """llama.cpp's converter's list of added tokens that are control tokens though not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def sentencepiece_vocab(folder: Path, rows: int) -> SentencePieceVocab:
    """The GGUF token list, scores and types of ``folder``'s tokenizer.model for an embedding of ``rows`` rows."""
    tokens = [f"[PAD{i}]" for i in range(rows)]
    scores = [-10000.0] * rows
    types = [UNUSED] * rows
    pieces = read_pieces(folder / "tokenizer.model")
    hf = json_object(folder / "tokenizer.json")
    # a file cut at a piece boundary parses, only shorter: tokenizer.json's own pieces (its added tokens aside) say
    # how many there are
    known = hf.get("model", {}).get("vocab") if isinstance(hf.get("model"), dict) else None
    added = {t.get("id") for t in hf.get("added_tokens", []) if isinstance(t, dict)}
    ids = [i for i in known.values() if isinstance(i, int) and i not in added] if isinstance(known, dict) else []
    if ids and max(ids) >= len(pieces):
        raise LowbitError(f"{folder / 'tokenizer.model'} holds {len(pieces)} pieces, tokenizer.json names piece "
                          f"{max(ids)}: the file is truncated or another model's; GGUF export needs the model's own "
                          "tokenizer.model")
    for i, (piece, score, kind) in enumerate(pieces[:rows]):
        tokens[i], scores[i], types[i] = piece, score, kind if kind in _KEPT_TYPES else NORMAL
    for token, i in json_object(folder / "added_tokens.json").items():
        if isinstance(i, int) and 0 <= i < rows:
            tokens[i], scores[i], types[i] = token, -1000.0, USER_DEFINED
    decoder = json_object(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    for key, entry in (decoder.items() if isinstance(decoder, dict) else [(None, decoder)]):
        _add_token(tokens, scores, types, key, entry, "tokenizer_config.json's added_tokens_decoder")
    for entry in hf.get("added_tokens", []):
        i = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(i, int) or (0 <= i < rows and types[i] in (NORMAL, UNUSED)):
            _add_token(tokens, scores, types, i, entry, "tokenizer.json's added_tokens")
    return SentencePieceVocab(tokens, scores, types)


def _add_token(tokens: list[str], scores: list[float], types: list[int], key: object, entry: object,
               where: str) -> None:
    """An added token at id ``key``: control when marked special or looking special, else user-defined with "▁" as
    a space (llama.cpp keeps user-defined tokens pre-normalized); score -1000. An id past the vocabulary is skipped
    (as llama.cpp's converter skips it); an entry of another shape is refused."""
    try:
        i = int(key)  # type: ignore[call-overload]
        token = entry["content"]  # type: ignore[index]
        if not isinstance(token, str):
            raise TypeError
    except (TypeError, ValueError, KeyError):
        raise LowbitError(f"{where} has an entry {str(key)[:40]!r}: {str(entry)[:80]!r}, not an id with "
                          "{\"content\": TOKEN}; fix the tokenizer files (`save_pretrained` of the tokenizer writes them)")
    if not 0 <= i < len(tokens):
        return
    if entry.get("special") or looks_special(token):
        tokens[i], types[i] = token, CONTROL
    else:
        tokens[i], types[i] = token.replace(_SPACE, " "), USER_DEFINED
    scores[i] = -1000.0


def json_object(path: Path) -> dict:
    """The JSON object in ``path``; {} when there is no such file; refused when it is unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"cannot read {path} ({str(exc)[:120]}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or remove the file")
    return data
