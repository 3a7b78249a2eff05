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
    names = _convert(gguf_file, out)
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
