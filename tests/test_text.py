"""Text sources and their split: every format reads, calibration and evaluation parts are disjoint and
deterministic, calibration sampling is seeded, and bad files say what is wrong."""

import json

import pytest
import torch

from lowbit.data.calibration import calibration_ids
from lowbit.data.text import documents, load_documents, split_documents
from lowbit.errors import LowbitError
from toy import byte_tokenizer

DOCS = [f"Document number {i} talks about topic {i * 31 % 97}." for i in range(300)]


def test_split_is_disjoint_complete_and_independent_of_order():
    calib, evaluation = split_documents(DOCS, "calibration"), split_documents(DOCS, "evaluation")
    assert not set(calib) & set(evaluation) and len(calib) + len(evaluation) == len(DOCS)
    assert 0.03 < len(evaluation) / len(DOCS) < 0.2  # about 10%
    assert set(split_documents(DOCS[::-1], "evaluation")) == set(evaluation)


def test_embedded_wikipedia_split():
    calib, evaluation = documents("wiki", "calibration"), documents("wiki", "evaluation")
    assert not set(calib) & set(evaluation)
    assert len(calib) + len(evaluation) == len(load_documents("wiki")) > 9000
    assert 800 < len(evaluation) < 1200


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json-strings", "json-objects", "datasets"])
def test_every_source_format_reads_the_same_documents(fmt, tmp_path):
    if fmt == "txt":
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(DOCS))
    elif fmt == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    elif fmt == "json-strings":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps(DOCS))
    elif fmt == "json-objects":
        path = tmp_path / "docs.json"
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
    else:
        import datasets

        path = tmp_path / "docs-dataset"
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(path))
    assert load_documents(str(path)) == DOCS


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "fine"}\n{"no_text": 1}\n', "line 2 is not a JSON object with a 'text' field"),
    ("bad.json", '{"text": "not a list"}', "must hold a JSON list"),
    ("empty.txt", "\n\n  \n", "holds no text"),
])
def test_bad_text_files_are_clear_errors(name, content, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(LowbitError, match=message):
        load_documents(str(tmp_path / name))


def test_datasets_folder_without_text_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(LowbitError, match="no 'text' column"):
        load_documents(str(tmp_path / "d"))


def test_missing_source():
    with pytest.raises(LowbitError, match="does not exist"):
        load_documents("/no/such/file.txt")


def test_calibration_ids_are_seeded_and_shaped():
    tokenizer = byte_tokenizer()
    a = calibration_ids(tokenizer, DOCS, 4, 64, seed=0)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_ids(tokenizer, DOCS, 4, 64, seed=0))
    assert not torch.equal(a, calibration_ids(tokenizer, DOCS, 4, 64, seed=1))
    with pytest.raises(LowbitError, match="fewer than one sequence"):
        calibration_ids(tokenizer, DOCS[:2], 4, 4096)
