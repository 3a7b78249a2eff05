"""GGUF import streams (models/gguf_import.py): tensor by tensor, memory-mapped, through transformers' own
per-architecture processors and name map; the tensors it writes are exactly those transformers' loader builds."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import GPTQ, WeightQuant
from lowbit.export.gguf import write_gguf
from lowbit.models.checkpoint import CheckpointReader
from lowbit.models.gguf_import import _convert
from toy import byte_tokenizer, calibration, toy_model


@pytest.mark.parametrize("grid", [WeightQuant(8, True, "group", 32), WeightQuant(4, True, "group", 32),
                                  WeightQuant(4, False, "group", 32)], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_streamed_import_equals_transformers_loading(tmp_path, grid, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = lowbit.quantize(toy_model("llama", biases=False), [GPTQ(grid)], calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    gguf_file = tmp_path / "m.gguf"
    write_gguf(tmp_path / "q", lowbit.load(tmp_path / "q"), gguf_file)
    monkeypatch.setattr("lowbit.models.gguf_import.SHARD_BYTES", 1 << 16)  # several shards even for a toy
    out = tmp_path / "imported"
    out.mkdir()
    names, _ = _convert(gguf_file, out)
    reader = CheckpointReader(out)
    assert len({reader._file_of[n] for n in names}) > 1  # noqa: SLF001 (sharded as a large model would be)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32).state_dict()
    ours = reader.get_many(names)
    assert set(ours) <= set(theirs) and set(theirs) - set(ours) <= {"lm_head.weight"}  # a tied head is stored once
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_a_gguf_missing_a_tensor_is_refused(tmp_path):
    import gguf

    from lowbit.errors import LowbitError

    model = lowbit.quantize(toy_model("llama", biases=False), [GPTQ(WeightQuant(8, True, "group", 32))],
                            calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    full = tmp_path / "m.gguf"
    write_gguf(tmp_path / "q", lowbit.load(tmp_path / "q"), full)
    reader = gguf.GGUFReader(str(full))
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_down.weight":
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "imported"
    out.mkdir()
    with pytest.raises(LowbitError, match="lacks 1 tensor"):
        _convert(tmp_path / "cut.gguf", out)


@pytest.fixture
def toy_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    model = lowbit.quantize(toy_model("llama", biases=False), [GPTQ(WeightQuant(8, True, "group", 32))],
                            calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    write_gguf(tmp_path / "q", lowbit.load(tmp_path / "q"), tmp_path / "m.gguf")
    return tmp_path / "m.gguf"


def test_the_cache_is_bfloat16_unless_float32_is_asked_for(toy_gguf, monkeypatch):
    import json

    from lowbit.errors import LowbitError
    from lowbit.models.gguf_import import import_gguf

    monkeypatch.delenv("LOWBIT_GGUF_DTYPE", raising=False)
    narrow = import_gguf(toy_gguf)
    config = json.loads((narrow / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # as a Hub folder names it (llama.cpp's converter reads it)
    del config["architectures"]  # an entry written before lowbit named the class is converted again
    (narrow / "config.json").write_text(json.dumps(config))
    assert import_gguf(toy_gguf) == narrow and "architectures" in json.loads((narrow / "config.json").read_text())
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    wide = import_gguf(toy_gguf)
    assert narrow != wide  # one cache entry per dtype, each validated against its own record
    ours, theirs = (CheckpointReader(f) for f in (narrow, wide))
    names = ours.keys()
    assert sorted(names) == sorted(theirs.keys())
    low, high = ours.get_many(names), theirs.get_many(names)
    assert all(low[n].dtype == torch.bfloat16 and high[n].dtype == torch.float32 for n in names)
    assert all(torch.equal(low[n], high[n].to(torch.bfloat16)) for n in names)  # one rounding, nothing else
    assert json.loads((narrow / "config.json").read_text())["dtype"] == "bfloat16"
    assert sum(t.nbytes for t in low.values()) * 2 == sum(t.nbytes for t in high.values())
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float8")
    with pytest.raises(LowbitError, match="LOWBIT_GGUF_DTYPE='float8' is not an import dtype; set it to one of"):
        import_gguf(toy_gguf)


def test_narrowing_in_place_equals_a_cast_across_chunk_edges(monkeypatch):
    from lowbit.models.gguf_import import narrowed_in_place

    monkeypatch.setattr("lowbit.models.gguf_import.CHUNK_VALUES", 64)
    for rows in (1, 21, 32, 33, 100):  # [rows, 2]: chunk edges inside, at and past the end
        values = torch.randn(rows, 2) * 1e3
        expected = values.to(torch.bfloat16)
        buffer = values.clone()
        got = narrowed_in_place(buffer, torch.bfloat16)
        assert torch.equal(got, expected) and got.data_ptr() == buffer.data_ptr()  # in the same memory


def test_streamed_shards_read_back_exactly_with_safetensors_own_loader(tmp_path):
    from safetensors.torch import load_file

    from lowbit.io.stream_shards import StreamingShardWriter

    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(i + 1, 5).to((torch.float32, torch.bfloat16, torch.float16)[i % 3])
               for i in range(40)}
    tensors |= {"ids": torch.arange(7), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
                "mask": torch.tensor([True, False, True])}
    writer = StreamingShardWriter(tmp_path, shard_bytes=400, header_bytes=1024)  # both limits close shards
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3
    read = {}
    for shard in shards:
        read |= load_file(shard)
    assert read.keys() == tensors.keys()
    assert all(read[n].dtype == t.dtype and torch.equal(read[n], t) for n, t in tensors.items())
    assert CheckpointReader(tmp_path).keys() and sorted(CheckpointReader(tmp_path).keys()) == sorted(tensors)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("ids", torch.arange(2))


def test_a_gguf_sources_own_tokenizer_travels_into_its_gguf_export(tmp_path, monkeypatch, capsys):
    """transformers' tokenizer.json of a SentencePiece GGUF is lossy (scores, token types) and not a byte-level BPE
    one lowbit can write back; the import keeps the source's tokenizer keys (tokenizer.gguf), the output carries them,
    and its GGUF export has them exactly."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from lowbit.cli.main import main
    from lowbit.models.gguf_import import import_gguf
    from lowbit.models.gguf_tokenizer_fields import TOKENIZER_GGUF, tokenizer_fields
    from tiny_gguf import tiny_model, write_tiny_gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "src.gguf", tiny_model("llama"), T.F32, spm=True)
    assert (import_gguf(source) / TOKENIZER_GGUF).is_file()
    code = main(["quantize", "--model", str(source), "--recipe", "w4g32-sym", "--format", "gguf",
                 "--out", str(tmp_path / "out"), "--nsamples", "2", "--seq-len", "16"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / TOKENIZER_GGUF).is_file()
    theirs = tokenizer_fields(gguf.GGUFReader(str(source)))
    ours = tokenizer_fields(gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")))
    assert [k for k, *_ in ours] == [k for k, *_ in theirs] and "tokenizer.ggml.scores" in [k for k, *_ in ours]
    assert ours == theirs  # keys, values and value types
    assert tokenizer_fields(gguf.GGUFReader(str(tmp_path / "out" / TOKENIZER_GGUF))) == theirs


def test_an_import_of_an_older_lowbit_without_the_tokenizer_keys_is_converted_again(tmp_path, monkeypatch):
    """A cache entry written before the import kept the file's tokenizer keys (no tokenizer.gguf, no record of it)
    does not validate: it is converted again, so its GGUF export gets the SentencePiece keys instead of a refusal."""
    import json

    from gguf import GGMLQuantizationType as T

    from lowbit.models.gguf_import import IMPORT_RECORD, import_gguf
    from lowbit.models.gguf_tokenizer_fields import TOKENIZER_GGUF
    from tiny_gguf import tiny_model, write_tiny_gguf

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "src.gguf", tiny_model("llama"), T.F32, spm=True)
    folder = import_gguf(source)
    (folder / TOKENIZER_GGUF).unlink()
    record = json.loads((folder / IMPORT_RECORD).read_text())
    del record["tokenizer_kept"]
    (folder / IMPORT_RECORD).write_text(json.dumps(record))
    assert import_gguf(source) == folder and (folder / TOKENIZER_GGUF).is_file()
    assert json.loads((folder / IMPORT_RECORD).read_text())["tokenizer_kept"] is True
