"""What lowbit reads is never trusted: no code from a model folder runs, every parameter comes from the file (no
weight is invented or dropped), shard paths stay inside the model folder, and a conversion cache entry is used
only when it validates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli.main import main
from lowbit.models.gguf_import import IMPORT_RECORD, import_gguf


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["--quiet", *map(str, argv)])
    return code, capsys.readouterr().err


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_code_in_the_model_folder_never_runs(toy_folder, tmp_path):
    """A config asking for the folder's own classes: refused for an unknown type, even with 'y' on stdin (older
    lowbit let transformers ask and run the code); a type transformers knows is built from its own classes."""
    folder = copy_of(toy_folder(), tmp_path)
    marker = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}
    edit_json(folder / "config.json", model_type="custom-llm", auto_map=auto_map)
    command = [sys.executable, "-m", "lowbit.cli.main", "quantize", "--model", str(folder), "--recipe", "w8",
               "--out", str(tmp_path / "q")]
    child = subprocess.run(command, input="y\ny\ny\n", capture_output=True, text=True)
    assert child.returncode == 2 and "never runs code from a model folder" in child.stderr
    assert child.stderr.count("\n") == 1 and not marker.exists() and not (tmp_path / "q").exists()
    edit_json(folder / "config.json", model_type="llama")
    edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_custom.Custom", None]})
    child = subprocess.run(command + ["--measure", "--nsamples", "2", "--seq-len", "16"], input="y\n",
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert not marker.exists() and (tmp_path / "q" / "lowbit_config.json").exists()


def test_every_parameter_comes_from_the_checkpoint(toy_folder, tmp_path, capsys):
    folder = copy_of(toy_folder(), tmp_path)
    weights = folder / "model.safetensors"
    original = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    cases = {
        "missing": ({k: v for k, v in original.items() if k != name}, f"tensor {name!r} is missing"),
        "renamed": ({(k + "_renamed" if k == name else k): v for k, v in original.items()}, "is missing"),
        "extra": ({**original, "model.layers.1.mlp.extra.weight": torch.ones(2)}, "has no place for"),
        "reshaped": ({**original, name: original[name][:, :-1].contiguous()}, "do not belong to this config"),
    }
    for case, (tensors, message) in cases.items():
        save_file(tensors, weights, metadata={"format": "pt"})
        for command in (["quantize", "--model", folder, "--recipe", "w8", "--out", tmp_path / "q"], ["eval", folder]):
            code, err = run(capsys, *command)
            assert code == 2 and message in err and err.count("\n") == 1, (case, err)
            assert not (tmp_path / "q").exists()


def test_an_index_cannot_point_outside_the_model_folder(toy_folder, tmp_path, capsys):
    folder = copy_of(toy_folder(), tmp_path)
    names = list(load_file(folder / "model.safetensors"))
    shutil.copy(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run(capsys, "quantize", "--model", folder, "--recipe", "w8", "--out", tmp_path / "q")
    assert code == 2 and "outside the model folder" in err


def test_an_edited_lowbit_output_is_loaded_strictly(toy_folder, tmp_path, capsys):
    assert run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w4g128", "--out", tmp_path / "q")[0] == 0
    shard = tmp_path / "q" / "block-00001.safetensors"
    tensors = load_file(shard)
    dropped = next(k for k in sorted(tensors) if "up_proj" in k and not k.endswith("bias"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    code, err = run(capsys, "eval", tmp_path / "q")
    assert code == 2 and dropped in err


def rewrite_gguf(source: Path, target: Path, rename: dict[str, str]) -> None:
    """Copy a GGUF file with some tensors renamed (metadata and data as they were)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(rename.get(tensor.name, tensor.name), np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    from lowbit import RTN, WeightQuant
    from test_export import quantized_folder

    import lowbit
    from lowbit.export.gguf import write_gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = quantized_folder(tmp_path, [RTN(WeightQuant(bits=8, symmetric=True, group_size=32))], biases=False)
    write_gguf(folder, lowbit.load(folder), tmp_path / "model.gguf")
    return tmp_path / "model.gguf"


def test_a_gguf_missing_a_tensor_is_refused_and_not_cached(gguf_file, tmp_path, capsys):
    renamed = tmp_path / "renamed.gguf"
    rewrite_gguf(gguf_file, renamed, {"blk.1.ffn_up.weight": "blk.1.ffn_upx.weight"})
    code, err = run(capsys, "quantize", "--model", renamed, "--recipe", "w8", "--out", tmp_path / "out")
    last = err.strip().splitlines()[-1]  # transformers' own conversion progress bar comes before it
    assert code == 2 and last.startswith("lowbit: error:") and "model.layers.1.mlp.up_proj.weight" in last
    assert "Traceback" not in err and list((tmp_path / "cache" / "gguf").iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_conversion_cache_entry_is_used_only_when_it_validates(gguf_file):
    from lowbit.models.checkpoint import CheckpointReader

    folder = import_gguf(gguf_file)
    record = json.loads((folder / IMPORT_RECORD).read_text())
    assert record["tensors"] == sorted(CheckpointReader(folder).keys())
    assert import_gguf(gguf_file) == folder  # reused as it is
    name = record["tensors"][0]
    shard = folder / CheckpointReader(folder)._file_of[name]  # noqa: SLF001
    weights = load_file(shard)
    save_file({k: v for k, v in weights.items() if k != name}, shard)  # damaged by hand
    assert import_gguf(gguf_file) == folder
    assert name in CheckpointReader(folder).keys()  # converted again, whole
    (folder / IMPORT_RECORD).unlink()  # an entry an interrupted or older run left
    import_gguf(gguf_file)
    assert json.loads((folder / IMPORT_RECORD).read_text()) == record


def test_an_output_whose_config_lost_a_layer_is_refused(toy_folder, tmp_path, capsys):
    assert run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w4g128", "--out", tmp_path / "q")[0] == 0
    edit_json(tmp_path / "q" / "config.json", num_hidden_layers=1)
    code, err = run(capsys, "eval", tmp_path / "q")
    assert code == 2 and "model.layers.1." in err and err.count("\n") == 1


def test_the_python_api_checks_calibration_ids_against_the_model():
    from lowbit import GPTQ, quantize
    from lowbit.errors import LowbitError
    from toy import VOCAB, calibration, toy_model

    ids = calibration(n=2, length=16)
    ids[0, 3] = VOCAB  # one past the embedding table
    with pytest.raises(LowbitError, match="embedding has 320 rows"):
        quantize(toy_model("llama"), [GPTQ()], ids)
    with pytest.raises(LowbitError, match="learned positions"):
        quantize(toy_model("gpt2"), [GPTQ()], calibration(n=1, length=300))


def test_same_seed_and_inputs_give_byte_identical_weight_files(toy_folder, tmp_path, capsys):
    from toy import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    for out in ("a", "b"):
        code, err = run(capsys, "quantize", "--model", toy_folder(), "--recipe", "awq-gptq-w4g128", "--out",
                        tmp_path / out, "--calib", corpus, "--nsamples", "4", "--seq-len", "32", "--seed", "7")
        assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
