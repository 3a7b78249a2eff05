"""Property tests (hypothesis) over generated bad input: mutated recipes, lowbit_config.json files and reports,
truncated and corrupted checkpoints, arbitrary calibration files. The invariant everywhere: a correct result, or a
LowbitError (the CLI: exit 2, one `lowbit: error:` line, the disk unchanged); never another exception, never a
silently different model. Derandomized, so CI runs the same examples every time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.cli.compare_cmd import block_errors
from lowbit.cli.main import main
from lowbit.data.text import load_documents
from lowbit.errors import LowbitError
from lowbit.presets import preset_names, resolve_recipe
from lowbit.recipe import Recipe
from toy import calibration

FUZZ = settings(
    derandomize=True, deadline=None, max_examples=150, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a decoded JSON value (the root included)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw, document: Any) -> Any:
    """``document`` with one place changed: a value replaced by arbitrary JSON, a key removed or one added."""
    document = json.loads(json.dumps(document))
    where = draw(st.sampled_from(paths(document)))
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if not where:
        return draw(JSON) if kind == "replace" else document
    parent = document
    for key in where[:-1]:
        parent = parent[key]
    last = where[-1]
    if kind == "replace":
        parent[last] = draw(JSON)
    elif kind == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON)
    else:
        parent.insert(last, draw(JSON))
    return document


REFUSED = object()


def outcome(call: Any) -> Any:
    """``call()``'s value, or REFUSED when it raised a one-line LowbitError (anything else fails the test)."""
    try:
        value = call()
    except LowbitError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return REFUSED
    event("accepted")
    return value


PRESETS = [resolve_recipe(name).to_dict() for name in sorted(preset_names())]


@FUZZ
@given(st.sampled_from(PRESETS).flatmap(mutated))
def test_a_mutated_recipe_is_a_valid_recipe_or_one_error(data):
    recipe = outcome(lambda: Recipe.from_dict(data))
    if recipe is not REFUSED:  # what is accepted round-trips exactly
        assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


@FUZZ
@given(st.binary(max_size=300))
def test_any_recipe_file_bytes_give_a_recipe_or_one_error(tmp_path, content):
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    outcome(lambda: Recipe.from_file(path))


@FUZZ
@given(st.sampled_from([".txt", ".json", ".jsonl"]), st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_text_file_gives_documents_or_one_error(tmp_path, suffix, content):
    path = tmp_path / f"text{suffix}"
    path.write_bytes(content)
    docs = outcome(lambda: load_documents(str(path)))
    if docs is not REFUSED:
        assert docs and all(isinstance(d, str) and d.strip() for d in docs)


@pytest.fixture(scope="module")
def quantized(toy_folder, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A GPTQ W4 g32 lowbit output of the toy Llama, and its logits on a fixed input."""
    out = tmp_path_factory.mktemp("fuzz") / "q"
    quantize_checkpoint(toy_folder(), resolve_recipe("gptq-w4g128"), calibration(n=2, length=16), out, progress=False)
    with torch.no_grad():
        logits = lowbit.load(out)(calibration(n=1, length=12, seed=3)).logits
    return out, logits


def damaged_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    return copy


@FUZZ
@given(data=st.data())
def test_a_mutated_lowbit_config_loads_the_same_model_or_is_refused(quantized, tmp_path, data):
    folder, logits = quantized
    copy = damaged_copy(folder, tmp_path)
    config = json.loads((folder / "lowbit_config.json").read_text())
    (copy / "lowbit_config.json").write_text(json.dumps(data.draw(mutated(config))))
    model = outcome(lambda: lowbit.load(copy))
    if model is not REFUSED:  # accepted: the same model
        with torch.no_grad():
            assert torch.equal(model(calibration(n=1, length=12, seed=3)).logits, logits)


@FUZZ
@given(data=st.data())
def test_a_mutated_quant_report_is_read_or_refused(quantized, tmp_path, data):
    folder, _ = quantized
    copy = tmp_path / "report"
    copy.mkdir(exist_ok=True)
    report = json.loads((folder / "quant_report.json").read_text())
    (copy / "quant_report.json").write_text(json.dumps(data.draw(mutated(report))))
    errors = outcome(lambda: block_errors(copy))
    if errors is not REFUSED:
        assert all(isinstance(e, float) for e in errors)


def header_end(path: Path) -> int:
    """Bytes of a safetensors file's length prefix and JSON header (what a flip there corrupts detectably)."""
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_truncated_or_corrupted_checkpoint_quantizes_or_is_refused(toy_folder, tmp_path, capsys, data):
    """Cut anywhere, or a byte changed in the header: exit 0 with an output, or exit 2 with one line and nothing
    written. (A changed byte inside the tensor data is a different, valid checkpoint: no format can tell.)"""
    copy = damaged_copy(toy_folder(), tmp_path)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        at = data.draw(st.integers(0, header_end(weights) - 1))
        raw[at] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]))
    weights.write_bytes(bytes(raw))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    before = sorted(os.listdir(tmp_path))
    code = main(["--quiet", "quantize", "--model", str(copy), "--recipe", "w8", "--out", str(out)])
    err = capsys.readouterr().err
    if code == 0:
        assert (out / "lowbit_config.json").exists()
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("lowbit: error:"), err
    assert sorted(os.listdir(tmp_path)) == before
