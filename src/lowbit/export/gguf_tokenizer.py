"""A byte-level BPE tokenizer.json as GGUF tokenizer metadata, including the pre-tokenizer llama.cpp must apply.

llama.cpp does not read the tokenizer.json's pre-tokenizer; it picks a built-in one by the name in
``tokenizer.ggml.pre``. A wrong name still loads and runs, silently tokenizing differently (its "default" splits
punctuation and digit runs unlike GPT-2; measured on 20 SmolLM2 evaluation documents: 2,157 tokens against the
Hugging Face tokenizer's 2,135, by bench/export_agreement.py --reader llama.cpp). So the name is derived from
the pre-tokenizer's structure, and one lowbit cannot name is refused rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.export.sentencepiece_vocab import CONTROL, NORMAL, UNUSED, USER_DEFINED, json_object, looks_special

# The Split regexes of the tokenizers llama.cpp names (its convert_hf_to_gguf.py tells them apart the same way).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _parts(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers", []))
    return [pre_tokenizer]


def gguf_pre_tokenizer(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json ``pre_tokenizer`` (a byte-level BPE one)."""
    parts = _parts(pre_tokenizer)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = _SPLIT_NAMES.get(parts[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise LowbitError(
        f"GGUF export cannot name this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pre_tokenizer)[:200]}); "
        "it knows GPT-2, SmolLM/StarCoder, Llama 3 and Qwen2 byte-level BPE. Export compressed-tensors instead"
    )


def tokenizer_metadata(folder: Path, rows: int | None = None) -> dict[str, Any]:
    """GGUF tokenizer keys from a byte-level BPE tokenizer.json (GPT-2 style, as Llama 3, SmolLM2, Qwen use); with
    ``rows``, the token list padded with unused ``[PAD<id>]`` tokens to the embedding's rows, as llama.cpp's
    converter pads it (llama.cpp sizes token_embd by the token count: Qwen2.5 has 151,665 tokens, 151,936 rows)."""
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LowbitError(f"cannot read {path} ({exc}); GGUF export needs the model's tokenizer.json") from None
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "a SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else repr(model.get("type"))
        raise LowbitError(f"GGUF export writes byte-level BPE tokenizers, SentencePiece ones from their "
                          f"tokenizer.model, and a GGUF source's own (kept as tokenizer.gguf at import); {path} is "
                          f"{kind} and the folder has neither of the others. Export compressed-tensors, or add the "
                          "model's tokenizer.model")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for token in added.values():
        vocab[token["content"]] = token["id"]
    tokens = [f"[PAD{i}]" for i in range(max(max(vocab.values()) + 1, rows or 0))]
    for token, index in vocab.items():
        tokens[index] = token
    types = [_token_type(t, added.get(t), t in vocab) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = gguf_pre_tokenizer(data.get("pre_tokenizer"))
    return {"tokens": tokens, "token_types": types, "merges": merges, "pre": pre, "add_bos": adds_bos(folder, data)}


def _token_type(token: str, added: dict[str, Any] | None, known: bool) -> int:
    """llama.cpp's converter's type for a byte-level BPE token: an added token is control when marked special or
    looking special (Qwen's ``<|im_start|>``), else user-defined (matched whole, as Hugging Face matches added tokens
    before BPE: Qwen2.5's ``<tool_call>``); an id no token has is unused; every other token is normal."""
    if added is not None:
        return CONTROL if added.get("special") or looks_special(token) else USER_DEFINED
    return NORMAL if known else UNUSED


def adds_bos(folder: Path, data: dict[str, Any]) -> bool:
    """Whether the Hugging Face tokenizer starts every text with its BOS token: tokenizer_config.json's add_bos_token
    where set, else whether tokenizer.json's post-processor template begins with a special token. Written into the
    GGUF, since llama.cpp's default depends on the pre-tokenizer's name (true for Llama 3's, false for SmolLM's)."""
    config = json_object(folder / "tokenizer_config.json")
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False
