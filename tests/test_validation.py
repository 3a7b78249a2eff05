"""Every file lowbit reads is checked against its schema and every CLI number against its range: bad input is one
line `lowbit: error: <what>; <how to fix>` and exit code 2, never a traceback and never a silently wrong result."""

import codecs
import json
import logging
import re
import shutil

import pytest
from transformers import AutoModelForCausalLM

from lowbit.api import quantize_checkpoint
from lowbit.cli.compare_cmd import block_errors, read_diagnosis
from lowbit.cli.main import main
from lowbit.data.text import load_documents
from lowbit.errors import LowbitError
from lowbit.evaluation.comparison import reusable_rows
from lowbit.presets import preset_names, resolve_recipe
from lowbit.recipe import RTN, Recipe, WeightQuant
from toy import byte_tokenizer, toy_config, write_corpus

SMALL = ["--nsamples", "2", "--seq-len", "32", "--batch-size", "2"]
NO_MODEL = "/no/such/model"  # a range check that let a number through fails fast on it, not on the default model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module")
def quantized(toy_folder, tmp_path_factory):
    """A data-free W4 g128 lowbit output of the toy Llama (no forward pass: fast)."""
    out = tmp_path_factory.mktemp("quantized") / "q"
    quantize_checkpoint(toy_folder(), resolve_recipe("w4g128"), None, out, progress=False)
    return out


def refused(capsys, *argv) -> str:
    """Run the CLI in-process; assert it ended with exactly one `lowbit: error:` line and exit 2; return that line."""
    capsys.readouterr()  # drop what building the toy model fixtures printed
    code = main(["--quiet", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: ") and "; " in lines[0], err
    return lines[0]


# --- recipes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,message", [
    ({"steps": [{"type": "rtn", "bits": "4"}]}, 'weights.bits must be an integer, got "4"'),
    ({"steps": [{"type": "rtn", "bits": 4.5}]}, "weights.bits must be an integer, got 4.5"),
    ({"steps": [{"type": "rtn", "bits": True}]}, "weights.bits must be an integer, got true"),
    ({"steps": [{"type": "rtn", "symmetric": "no"}]}, 'weights.symmetric must be true or false, got "no"'),
    ({"steps": [{"type": "rtn", "weights": {"bits": 4, "size": 3}}]}, "weights has unknown keys ['size']"),
    ({"steps": [{"type": "rtn", "weights": "w4"}]}, 'weights must be an object or null, got "w4"'),
    ({"steps": [{"type": "gptq", "damp": "0.01"}]}, 'damp must be a number, got "0.01"'),
    ({"steps": [{"type": "gptq", "act_order": 1}]}, "act_order must be true or false, got 1"),
    ({"steps": [{"type": "gptq", "shrink": 1.5}]}, "gptq shrink must be in [0, 1], got 1.5"),
    ({"steps": [{"type": "prune", "sparsity": "half"}]}, 'sparsity must be a number or null, got "half"'),
    ({"steps": [{"type": "sparsegpt", "block_size": 0}]}, "sparsegpt block_size must be >= 1, got 0"),
    ({"steps": [{"type": "llm_int8", "threshold": 1e999}]}, "llm_int8 threshold must be a finite number > 0"),
    ({"steps": [{"type": ["rtn"]}]}, "unknown recipe step type ['rtn']"),
    ({"steps": [{"type": "rtn"}], "comment": "mine"}, "recipe has unknown keys ['comment']"),
    ({"steps": ["rtn"]}, 'recipe: steps[0] must be an object, got "rtn"'),
    ({"steps": []}, "a recipe needs at least one step"),
    ({"steps": {"type": "rtn"}}, "recipe: steps must be a list of objects"),
    ({"name": "no steps"}, "a recipe needs a 'steps' list"),
    ({"steps": [{"type": "rtn"}], "ignore": "lm_head"}, 'recipe: ignore must be a list of strings, got "lm_head"'),
    ({"steps": [{"type": "rtn"}], "ignore": ["lm_head", 3]}, "recipe: ignore[1] must be a string, got 3"),
    ({"steps": [{"type": "rtn"}], "name": 5}, "recipe: name must be a string, got 5"),
    ([{"type": "rtn"}], 'recipe must be an object, got [{"type": "rtn"}]'),
    ({"steps": [{"type": "awq", "weights": {"bits": 4, "group_size": 128}},
                {"type": "gptq", "weights": {"bits": 3, "group_size": 32}}]},
     "awq searches on W4 asym g128 but gptq rounds on W3 asym g32: one grid per recipe"),
])
def test_malformed_recipe_fields_are_one_line(recipe, message, toy_folder, tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    line = refused(capsys, "quantize", "--model", toy_folder(), "--recipe", path, "--out", tmp_path / "q")
    assert message in line and str(path) in line
    assert not (tmp_path / "q").exists()


def test_symmetric_no_is_refused_not_built_symmetric():
    """JSON "no" is truthy in Python: stored as given it would have built a symmetric grid."""
    with pytest.raises(LowbitError, match='symmetric must be true or false, got "no"'):
        Recipe.from_dict({"steps": [{"type": "rtn", "symmetric": "no"}]})
    with pytest.raises(LowbitError, match="bits must be an integer, got true"):
        RTN(WeightQuant(bits=True))  # the Python API gets the same checks as JSON


@pytest.mark.parametrize("encode", [
    lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
    lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),  # Windows PowerShell's `>`
    lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
])
def test_recipe_files_with_a_byte_order_mark_are_read(encode, tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(encode(resolve_recipe("gptq-w4g128").to_json()))
    assert Recipe.from_file(path) == resolve_recipe("gptq-w4g128")


@pytest.mark.parametrize("content,message", [
    (b'{"steps": [{"type": "rtn", "name": "caf\xe9"}]}', "is not UTF-8 text (byte 0xe9 at offset"),
    (b"", "is empty"),
    (b"{not json", "is not valid JSON"),
])
def test_unreadable_recipe_files_are_one_line(content, message, toy_folder, tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_bytes(content)
    assert message in refused(capsys, "quantize", "--model", toy_folder(), "--recipe", path, "--out", tmp_path / "q")


def test_every_preset_round_trips_through_json_exactly():
    for name in preset_names():
        recipe = resolve_recipe(name)
        again = Recipe.from_dict(json.loads(recipe.to_json()))
        assert again == recipe and again.to_dict() == recipe.to_dict(), name


@pytest.mark.parametrize("ignore,message", [
    (["*"], "ignore pattern '*' matches all 14 Linears"),
    (["*proj", "lm_head"], "ignore pattern '*proj' matches all 14 Linears"),
    (["*self_attn*", "*mlp*"], "ignore patterns '*self_attn*', '*mlp*' match together all 14 Linears"),
])
def test_ignore_patterns_that_leave_nothing_to_quantize(ignore, message, toy_folder, tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"steps": [{"type": "rtn"}], "ignore": ignore}))
    assert message in refused(capsys, "quantize", "--model", toy_folder(), "--recipe", path, "--out", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_ignore_patterns_that_leave_some_linears_run(toy_folder, tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"steps": [{"type": "rtn"}], "ignore": ["*mlp*", "model.layers.0.*"]}))
    assert main(["--quiet", "quantize", "--model", str(toy_folder()), "--recipe", str(path), "--out", str(tmp_path / "q")]) == 0
    modules = json.loads((tmp_path / "q" / "lowbit_config.json").read_text())["modules"]
    assert sorted(modules) == sorted(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")


# --- lowbit_config.json ------------------------------------------------------------------------------------------

def _first_module(config):
    return next(iter(config["modules"].values()))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("format_version"), "has no format_version: it was written by an older lowbit"),
    (lambda c: c.update(format_version=2), "format_version 2: it was written by a newer lowbit"),
    (lambda c: c.update(format_version=0), "format_version 0: it was written by an older lowbit"),
    (lambda c: c.update(format_version=True), "format_version must be an integer, got true"),
    (lambda c: c.update(dtype="float128"), "dtype 'float128' is not a float dtype"),
    (lambda c: c.update(dtype="int8"), "dtype 'int8' is not a float dtype"),
    (lambda c: c.update(modules=[]), "modules must be an object, got []"),
    (lambda c: c["modules"].update({"model.layers.9.mlp.up_proj": _first_module(c)}),
     "names module 'model.layers.9.mlp.up_proj', for which the checkpoint holds no tensors"),
    (lambda c: _first_module(c).update(group_size=0), "group_size must be >= 1, got 0"),
    (lambda c: _first_module(c).update(bits=9), "bits must be in 2..8, got 9"),
    (lambda c: _first_module(c).update(bits="4"), 'bits must be an integer, got "4"'),
    (lambda c: _first_module(c).update(symmetric="no"), 'symmetric must be true or false, got "no"'),
    (lambda c: _first_module(c).update({"class": "Int3Linear"}), "runtime module 'Int3Linear'"),
    (lambda c: _first_module(c).update(kernel="x"), "has keys ['kernel'] that WeightOnlyLinear does not take"),
    (lambda c: _first_module(c).pop("bits"), "lacks ['bits'], which WeightOnlyLinear needs"),
    (lambda c: c["recipe"]["steps"][0]["weights"].update(symmetric="no"), "weights.symmetric must be true or false"),
])
def test_damaged_lowbit_config_is_one_line(edit, message, quantized, tmp_path, capsys):
    folder = shutil.copytree(quantized, tmp_path / "q")
    config = json.loads((folder / "lowbit_config.json").read_text())
    edit(config)
    (folder / "lowbit_config.json").write_text(json.dumps(config))
    assert message in refused(capsys, "eval", folder)


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "must be an object, got [1, 2]"),
    (b'{"format": "lowbit", "dtype": "\xff"}', "is not UTF-8 text"),
    (b'{"format": "low', "is not valid JSON"),
])
def test_unreadable_lowbit_config_is_one_line(content, message, quantized, tmp_path, capsys):
    folder = shutil.copytree(quantized, tmp_path / "q")
    (folder / "lowbit_config.json").write_bytes(content)
    assert message in refused(capsys, "eval", folder)


# --- quant_report.json, inspect.json, results.json ----------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda r: r["blocks"][0].update(rel_error="high"), 'blocks[0].rel_error must be a number, got "high"'),
    (lambda r: r["blocks"][1]["linears"].append({"name": "x"}), "blocks[1].linears[7] lacks"),
    (lambda r: r["blocks"][0].update(color="red"), "blocks[0] has unknown keys ['color']"),
    (lambda r: r.update(blocks={}), "blocks must be a list of objects"),
    (lambda r: r.pop("recipe"), "lacks ['recipe']"),
])
def test_wrongly_shaped_quant_report(edit, message, quantized, tmp_path):
    folder = shutil.copytree(quantized, tmp_path / "q")
    report = json.loads((folder / "quant_report.json").read_text())
    assert len(block_errors(folder)) == 2  # the report as written is read
    edit(report)
    (folder / "quant_report.json").write_text(json.dumps(report))
    with pytest.raises(LowbitError, match=re.escape(message)):
        block_errors(folder)
    (folder / "quant_report.json").write_bytes(b'{"blocks": [')
    with pytest.raises(LowbitError, match="is not valid JSON"):
        block_errors(folder)


def test_wrongly_shaped_inspect_report(tmp_path):
    path = tmp_path / "inspect.json"
    path.write_text(json.dumps({"findings": "none"}))
    with pytest.raises(LowbitError, match='findings must be a list of strings, got "none"'):
        read_diagnosis(path)


@pytest.mark.parametrize("content,message", [
    ("{truncated", "is not valid JSON"),
    ('{"model": "m", "settings": {}, "rows": [{"recipe": "w8"}]}', r"results.json: rows\[0\] lacks \['config'"),
    ('{"model": "m", "settings": {}, "rows": [], "extra": 1}', None),  # keys lowbit does not read are left alone
    ("[]", "must be an object"),
])
def test_resumed_results_must_be_a_comparison(content, message, tmp_path):
    (tmp_path / "results.json").write_text(content)
    if message is None:
        assert reusable_rows(tmp_path, {}, "m") == {}
        return
    with pytest.raises(LowbitError, match=message):
        reusable_rows(tmp_path, {}, "m")


def test_compare_resume_with_corrupt_results_is_one_line(toy_folder, corpus, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text('{"model": ')
    line = refused(capsys, "compare", toy_folder(), "--recipes", "w8", "--out", tmp_path / "m", "--resume",
                   "--no-inspect", "--calib", corpus, *SMALL)
    assert "results.json is not valid JSON" in line and "--resume" in line


# --- calibration and evaluation text ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "is not UTF-8 text (byte 0xe9"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": 42}\n', "line 2: text must be a string, got 42"),
    ("bad.jsonl", b'{"text": null}\n', "line 1: text must be a string, got null"),
    ("bad.json", b'["caf\xe9"]', "is not UTF-8 text"),
    ("bad.json", b'[{"text": "a"}, {"text": 7}]', "[1].text must be a string, got 7"),
    ("bad.json", b'[{"text": "a"}, {"body": "b"}]', "[1] lacks ['text']"),
    ("empty.json", b"", "is empty"),
    ("empty.jsonl", b"", "holds no text"),
    ("empty.txt", b"", "holds no text"),
])
def test_bad_text_files(name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LowbitError) as caught:
        load_documents(str(tmp_path / name))
    assert message in str(caught.value) and "; " in str(caught.value)


def test_text_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF8 + "first\n\nsecond".encode())
    assert load_documents(str(tmp_path / "a.txt")) == ["first", "second"]


def test_bad_calibration_file_through_the_cli(toy_folder, tmp_path, capsys):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": 3.5}\n')
    line = refused(capsys, "quantize", "--model", toy_folder(), "--recipe", "gptq-w4g128", "--out", tmp_path / "q",
                   "--calib", tmp_path / "c.jsonl", *SMALL)
    assert "line 1: text must be a string, got 3.5" in line and not (tmp_path / "q").exists()


# --- CLI numbers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["quantize", "--model", NO_MODEL, "--out", "q", "--batch-size", "0"], "--batch-size 0 is out of range; need --batch-size >= 1"),
    (["quantize", "--model", NO_MODEL, "--out", "q", "--batch-size", "-4"], "--batch-size -4 is out of range"),
    (["quantize", "--model", NO_MODEL, "--out", "q", "--nsamples", "0"], "need --nsamples >= 1"),
    (["quantize", "--model", NO_MODEL, "--out", "q", "--seq-len", "1"], "need --seq-len >= 2"),
    (["quantize", "--model", NO_MODEL, "--out", "q", "--seed", "-1"], "need --seed in 0..4294967295"),
    (["eval", NO_MODEL, "--window", "0"], "need --window >= 2"),
    (["eval", NO_MODEL, "--window", "1"], "--window 1 is out of range"),
    (["eval", NO_MODEL, "--max-windows", "-1"], "need --max-windows >= 0"),
    (["generate", NO_MODEL, "--prompt", "x", "--max-new-tokens", "0"], "need --max-new-tokens >= 1"),
    (["generate", NO_MODEL, "--prompt", "x", "--temperature", "-0.5"], "need --temperature >= 0"),
    (["generate", NO_MODEL, "--prompt", "x", "--temperature", "inf"], "--temperature inf is out of range"),
    (["generate", NO_MODEL, "--prompt", "x", "--top-p", "0"], "need --top-p in (0, 1]"),
    (["generate", NO_MODEL, "--prompt", "x", "--top-p", "nan"], "--top-p nan is out of range"),
    (["bench", NO_MODEL, "--baseline", NO_MODEL, "--prefill-tokens", "0"], "need --prefill-tokens >= 1"),
    (["bench", NO_MODEL, "--baseline", NO_MODEL, "--new-tokens", "1"], "need --new-tokens >= 2"),
    (["bench", NO_MODEL, "--baseline", NO_MODEL, "--repeats", "0"], "need --repeats >= 1"),
    (["compare", NO_MODEL, "--methods", "rtn", "--bits", "4", "9", "--out", "c"], "--bits 9 is out of range; need --bits in 2..8"),
    (["compare", NO_MODEL, "--methods", "rtn", "--group-sizes", "-1", "--out", "c"], "need --group-sizes >= 0"),
    (["inspect", NO_MODEL, "--threshold", "0"], "need --threshold > 0"),
    (["inspect", NO_MODEL, "--ratio", "1"], "need --ratio > 1"),
    (["inspect", NO_MODEL, "--alpha", "1.5"], "need --alpha in 0..1"),
    (["inspect", NO_MODEL, "--sample-tokens", "0"], "need --sample-tokens >= 1"),
])
def test_numbers_out_of_range_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, *argv)
    assert list(tmp_path.iterdir()) == []  # refused while parsing: nothing was read or written


def test_malformed_numbers_keep_argparses_message(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["quantize", "--model", NO_MODEL, "--out", "q", "--batch-size", "abc"])
    assert caught.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def test_empty_prompt(capsys):
    assert '--prompt "" is empty' in refused(capsys, "generate", NO_MODEL, "--prompt", "")


# --- calibration ids against the model ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_seq_len_beyond_learned_positions_is_refused(model_type, toy_folder, corpus, tmp_path, capsys):
    for command in (["quantize", "--model", toy_folder(model_type), "--recipe", "gptq-w4g128", "--out", tmp_path / "q"],
                    ["inspect", toy_folder(model_type), "--out", tmp_path / "i"]):
        line = refused(capsys, *command, "--calib", corpus, "--nsamples", "1", "--seq-len", "300")
        assert "--seq-len asks for 300 tokens but the model has 256 learned positions" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "i").exists()


def test_seq_len_beyond_rotary_context_warns(toy_folder, corpus, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        code = main(["--quiet", "quantize", "--model", str(toy_folder("llama")), "--recipe", "w8", "--measure",
                     "--out", str(tmp_path / "q"), "--calib", str(corpus), "--nsamples", "1", "--seq-len", "300"])
    assert code == 0
    assert "300 tokens run beyond the model's trained context of 256 positions" in caplog.text


def test_tokenizer_larger_than_the_embedding_is_refused(corpus, tmp_path, capsys):
    config = toy_config("llama")
    config.update({"vocab_size": 200, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    folder = tmp_path / "small-vocab"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)  # byte ids reach 255
    line = refused(capsys, "quantize", "--model", folder, "--recipe", "gptq-w4g128", "--out", tmp_path / "q",
                   "--calib", corpus, *SMALL)
    assert "but the model's embedding has 200 rows" in line and not (tmp_path / "q").exists()


def test_the_shared_checker_names_the_json_path():
    from lowbit.schema import check_value

    with pytest.raises(LowbitError, match=r"^x: a\[1\]\['k'\] must be an integer, got 2.5; fix it$"):
        check_value({"a": [{"k": 1}, {"k": 2.5}]}, dict[str, list[dict[str, int]]], "x", "fix it")
    with pytest.raises(LowbitError, match="must be a string or null"):
        check_value(3, str | None, "x", "fix it")
    check_value(None, str | None, "x", "fix it")
    check_value(3, float, "x", "fix it")  # a JSON integer is a number


def test_ranges_refuse_nan_and_infinity():
    from lowbit.schema import Range

    assert 0.5 in Range(0, 1) and 0 not in Range(0, 1, open_low=True) and 1 in Range(0, 1, open_low=True)
    assert float("nan") not in Range() and float("inf") not in Range(0) and 10**400 in Range(0)
    assert str(Range(2, 8)) == "in 2..8" and str(Range(0, open_low=True)) == "> 0"

