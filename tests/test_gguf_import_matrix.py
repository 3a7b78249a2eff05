"""GGUF import (models/gguf_import.py) against transformers' own GGUF loading, over every GGML tensor type gguf-py
can dequantize and every architecture both transformers' GGUF support and lowbit cover: the tensors lowbit's
streaming importer writes are exactly (torch.equal) the ones AutoModelForCausalLM.from_pretrained(gguf_file=...)
builds. The files are tiny random GGUFs written by tests/tiny_gguf.py with gguf-py.

Architectures in both transformers' GGUF_CONFIG_MAPPING and tests/toy.py but left out here:
- mistral: transformers reads a file as Mistral only when general.architecture is "llama" and general.name is
  exactly "mistral", and then its own loader fails: get_gguf_hf_weights_map looks model_type "mistral" up in
  gguf-py's MODEL_ARCH_NAMES, which has no "mistral" (NotImplementedError "Unknown gguf model_type: mistral").
  Any other name loads as LlamaForCausalLM, which is the llama case (llama.cpp writes Mistral as "llama").
Architectures of tests/toy.py transformers cannot load from GGUF at all (not in GGUF_CONFIG_MAPPING, "GGUF model
with architecture ... is not supported yet"): gemma, opt, granite, olmo, olmo2, cohere, phimoe, olmoe, deepseek_v3,
and mixtral (llama.cpp writes Mixtral as a "llama" file with stacked ffn_*_exps tensors, for which transformers builds
a dense LlamaForCausalLM whose MLP tensors the file does not have). transformers' other GGUF architectures (falcon,
bloom, stablelm, mamba, nemotron, t5, umt5, gemma4, deci, lfm2, gpt_oss, minimax_m2, qwen35, ...) have no toy model
and are not in lowbit's table.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM

from lowbit.models.checkpoint import CheckpointReader
from lowbit.models.gguf_import import _convert
from tiny_gguf import CONFIG_SECTION, DEQUANTIZABLE, QUANTIZABLE, gguf_arch, tiny_model, write_tiny_gguf
from toy import ARCHITECTURES as TOY_ARCHITECTURES
from toy import DISCOVERED, MOE

# every type gguf-py dequantizes (so transformers' GGUF loading, which dequantizes with it, accepts): written from
# the model's weights where gguf-py quantizes the type (F32, F16, BF16, Q4_0..Q8_0, TQ1_0, TQ2_0, MXFP4), as random
# blocks otherwise (the K-quants, the IQ types, NVFP4). Q8_1, Q8_K and Q1_0 have no dequantizer in gguf-py 0.19.
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
         "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")
ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gpt2", "starcoder2", "gemma2", "gemma3_text", "qwen2_moe",
                 "qwen3_moe")
LEFT_OUT = ("mistral",)  # see the module docstring


@pytest.fixture(autouse=True)
def large_model_paths(monkeypatch):
    """The importer's paths for tensors and files larger than a toy's: several shards, and every tensor dequantized
    and checked a block of rows at a time."""
    monkeypatch.setattr("lowbit.models.gguf_import.SHARD_BYTES", 1 << 16)
    monkeypatch.setattr("lowbit.models.gguf_import.CHUNK_VALUES", 1 << 12)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors have at most ~80k values: on 2 cores torch's intra-op threads cost more than they save (an
    isfinite of 65k values took 17 ms with 2 threads while another process used one core, 0.1 ms with 1), which
    was half of every case's time. The values computed do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def imported_and_loaded(folder, gguf_file, dtype=None):  # noqa: ANN001, ANN201
    """(lowbit's imported tensors, transformers' state dict in float32) for ``gguf_file`` in ``folder``."""
    out = folder / "imported"
    out.mkdir()
    names, _ = _convert(gguf_file, out) if dtype is None else _convert(gguf_file, out, dtype=dtype)
    ours = CheckpointReader(out).get_many(names)
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name, dtype=torch.float32).state_dict()
    return ours, theirs


def assert_same_tensors(ours: dict, theirs: dict, tied: bool) -> None:
    assert set(ours) <= set(theirs)
    assert set(theirs) - set(ours) == ({"lm_head.weight"} if tied else set())  # a tied head is stored once
    unequal = [n for n in ours if ours[n].dtype != theirs[n].dtype or not torch.equal(ours[n], theirs[n])]
    assert not unequal, f"{len(unequal)} of {len(ours)} tensors differ from transformers', e.g. {unequal[:3]}"


def assert_writer_round_trips(model: torch.nn.Module, theirs: dict, ggml_type: T) -> None:
    """transformers loads the tiny model's own weights back (exact in F32 up to Gemma's norm offset of 1 added and
    subtracted in float32; within Q8_0's rounding in Q8_0): the file is laid out as llama.cpp would write it."""
    for name, weight in model.state_dict().items():
        if name not in theirs:
            continue
        assert theirs[name].shape == weight.shape, name
        atol = 1e-6 if ggml_type == T.F32 else float(weight.abs().max()) / 100  # Q8_0: error <= block max / 254
        torch.testing.assert_close(theirs[name], weight.float(), rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("type_name", TYPES)
def test_every_ggml_type_imports_as_transformers_loads_it(tmp_path, type_name):
    ggml_type = T[type_name]
    model = tiny_model("llama", width=256)  # 256-value rows: K-quant and IQ super-blocks
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", model, ggml_type)
    ours, theirs = imported_and_loaded(tmp_path, gguf_file)
    assert_same_tensors(ours, theirs, tied=model.config.tie_word_embeddings)
    if ggml_type == T.F32:
        assert_writer_round_trips(model, theirs, ggml_type)


@pytest.mark.parametrize("type_name", ["F32", "Q8_0"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_architecture_imports_as_transformers_loads_it(tmp_path, model_type, type_name):
    ggml_type = T[type_name]
    model = tiny_model(model_type)
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", model, ggml_type)
    ours, theirs = imported_and_loaded(tmp_path, gguf_file)
    assert_same_tensors(ours, theirs, tied=model.config.tie_word_embeddings)
    assert_writer_round_trips(model, theirs, ggml_type)


@pytest.mark.parametrize(("model_type", "type_name", "width"), [("llama", "Q4_K", 256), ("qwen3_moe", "Q8_0", None)])
def test_a_bfloat16_import_is_transformers_float32_tensors_cast(tmp_path, model_type, type_name, width):
    """Covers both of the importer's paths: tensors written as read, and MoE experts stacked across tensors."""
    model = tiny_model(model_type, width=width)
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", model, T[type_name])
    ours, theirs = imported_and_loaded(tmp_path, gguf_file, dtype=torch.bfloat16)
    assert_same_tensors(ours, {n: t.to(torch.bfloat16) for n, t in theirs.items()},
                        tied=model.config.tie_word_embeddings)


def test_the_matrix_covers_every_type_and_architecture_both_sides_support():
    """A gguf-py or transformers upgrade that adds a type or an architecture shows up here, not as silence."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING  # transformers' GGUF loader for these
    from transformers.integrations.gguf import GGUF_ARCHS  # its newer one (qwen35, lfm2, ...), keyed by GGUF name

    assert {T[name] for name in TYPES} == set(DEQUANTIZABLE)
    assert {T.F32, T.Q8_0} <= set(QUANTIZABLE)  # the architecture matrix's types are written from real weights
    toy_types = set(TOY_ARCHITECTURES) | set(DISCOVERED) | set(MOE)  # all lowbit quantizes
    both = {t for t in toy_types if CONFIG_SECTION.get(t, t) in GGUF_CONFIG_MAPPING or gguf_arch(t) in GGUF_ARCHS}
    assert both == set(ARCHITECTURES) | set(LEFT_OUT)
