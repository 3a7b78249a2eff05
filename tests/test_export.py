"""GGUF export: lowbit's integer weights land in Q8_0 / Q4_0 / Q4_1 blocks exactly, transformers loads the file
with the same logits as lowbit's own loader, and grids GGUF cannot hold are refused before anything is written."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit import RTN, GPTQ, WeightQuant
from lowbit.errors import LowbitError
from lowbit.export.gguf import permute_rows, write_gguf
from lowbit.api import open_model
from lowbit.presets import resolve_recipe
from tiny_gguf import assert_gguf_gives_lowbits_logits
from toy import byte_tokenizer, calibration, toy_model


def quantized_folder(tmp_path, recipe, name="q", biases=True):
    """A quantized toy Llama; ``biases=False`` for GGUF, whose llama architecture has no Linear biases."""
    model = lowbit.quantize(toy_model("llama", biases=biases), recipe, calibration(n=4, length=32), batch_size=2)
    folder = tmp_path / name
    lowbit.save(model, folder, tokenizer=byte_tokenizer())
    return folder


@pytest.mark.parametrize(
    "grid, kind, act_order",
    [(WeightQuant(bits=8, symmetric=True, group_size=32), "Q8_0", False),
     (WeightQuant(bits=4, symmetric=True, group_size=32), "Q4_0", False),
     (WeightQuant(bits=4, symmetric=True, group_size=32, fit="mse"), "Q4_0", False),  # a searched range: same blocks
     (WeightQuant(bits=4, symmetric=False, group_size=32), "Q4_1", False),
     # act-order's default groups stay in column order (static groups): plain GGUF blocks, no g_idx
     (WeightQuant(bits=4, symmetric=False, group_size=32), "Q4_1", True)],
)
def test_gguf_blocks_hold_lowbit_weights_and_transformers_loads_them(tmp_path, grid, kind, act_order, monkeypatch):
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")  # the exported values exactly, as transformers reads them
    import gguf

    folder = quantized_folder(tmp_path, [GPTQ(grid, act_order=act_order)], biases=False)
    model = lowbit.load(folder)
    out = tmp_path / "m.gguf"
    types = write_gguf(folder, model, out)
    assert set(types.values()) == {kind} and len(types) == 2 * 7
    reader = gguf.GGUFReader(str(out))
    pre = reader.fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == "gpt-2"  # the byte tokenizer's GPT-2 split, named for llama.cpp
    tensors = {t.name: t for t in reader.tensors}
    q = model.model.layers[1].self_attn.q_proj
    stored = tensors["blk.1.attn_q.weight"]
    assert stored.tensor_type.name == kind
    restored = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy())
    expected = permute_rows(q.dequantized_weight(), model.config.num_attention_heads)
    if kind == "Q4_1":  # m = -zero * scale is stored in float16
        assert torch.allclose(restored, expected, atol=2e-3 * expected.abs().max().item())
    else:
        assert torch.equal(restored, expected)
    # transformers reads the GGUF (metadata, tokenizer, q/k permutation) into the model lowbit evaluated
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = open_model(str(out)).model(ids).logits
    tolerance = 1e-4 if kind != "Q4_1" else 5e-2
    assert (theirs - ours).abs().max() < tolerance * ours.abs().max()


def test_gguf_export_refuses_grids_it_cannot_hold(tmp_path, capsys):
    from lowbit.cli.main import main

    folder = quantized_folder(tmp_path, [RTN(WeightQuant(bits=4, group_size=64))])
    code = main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert code == 2 and "group size 64" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob(".x.gguf*"))
    with pytest.raises(LowbitError, match="act-order"):
        desc_act = GPTQ(WeightQuant(bits=4, group_size=32), act_order=True, static_groups=False)  # a g_idx per column
        act_order = quantized_folder(tmp_path, [desc_act], "a")
        write_gguf(act_order, lowbit.load(act_order), tmp_path / "a.gguf")
    pruned = quantized_folder(tmp_path, [lowbit.Prune("magnitude", 0.5)], "p", biases=False)
    with pytest.raises(LowbitError, match="GGUF has no sparse format"):
        write_gguf(pruned, lowbit.load(pruned), tmp_path / "p.gguf")
    assert not list(tmp_path.glob("*p.gguf*"))
    biased = quantized_folder(tmp_path, [RTN(WeightQuant(bits=4, group_size=32))], "b")
    with pytest.raises(LowbitError, match="Linear biases"):  # the reader would drop them: a different model
        write_gguf(biased, lowbit.load(biased), tmp_path / "b.gguf")


def test_gguf_names_the_pre_tokenizer_llama_cpp_must_apply():
    """llama.cpp picks its pre-tokenizer by name; a wrong one runs but tokenizes differently, so unknown ones fail."""
    from lowbit.export.gguf_tokenizer import _LLAMA3_SPLIT, gguf_pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert gguf_pre_tokenizer(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert gguf_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    llama3 = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert gguf_pre_tokenizer(llama3) == "llama-bpe"
    with pytest.raises(LowbitError, match="cannot name this tokenizer's pre-tokenizer"):
        gguf_pre_tokenizer({"type": "Metaspace", "replacement": "_"})
    with pytest.raises(LowbitError, match="cannot name"):  # a Split regex it does not know is not guessed
        gguf_pre_tokenizer({"type": "Sequence", "pretokenizers": [{**split, "pattern": {"Regex": "x"}}, byte_level]})


def test_gguf_says_whether_the_tokenizer_adds_bos(tmp_path):
    """llama.cpp's default depends on the pre-tokenizer's name, so the flag is written as the HF tokenizer has it."""
    from lowbit.export.gguf_tokenizer import adds_bos

    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}]}
    assert adds_bos(tmp_path, {"post_processor": template})
    assert adds_bos(tmp_path, {"post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}})
    assert not adds_bos(tmp_path, {"post_processor": {"type": "ByteLevel"}})
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    assert not adds_bos(tmp_path, {"post_processor": template})  # the config's flag decides where it is set


def test_permutation_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(64, 8)
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 4).numpy(), 4, 4)
    assert np.array_equal(back, w.numpy())


def test_quantize_with_gguf_format_checks_the_recipe_first_and_writes_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")  # the exported values exactly, as transformers reads them
    import json

    from lowbit.cli.main import main
    from toy import save_toy, write_corpus

    model, corpus = save_toy("llama", tmp_path / "toy", biases=False), write_corpus(tmp_path / "c.txt")
    small = ["--calib", str(corpus), "--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]
    code = main(["quantize", "--model", str(model), "--recipe", "w4g128", "--format", "gguf", "--out", str(tmp_path / "bad"), *small])
    assert code == 2 and "use group_size 32" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    recipe = tmp_path / "q4_0.json"
    recipe.write_text(json.dumps({"steps": [{"type": "gptq", "weights": {"bits": 4, "symmetric": True, "group_size": 32}}]}))
    out = tmp_path / "ok"
    assert main(["quantize", "--model", str(model), "--recipe", str(recipe), "--format", "gguf", "--out", str(out), *small]) == 0
    ids = calibration(n=1, length=16, seed=2)
    with torch.no_grad():
        ours, theirs = lowbit.load(out)(ids).logits, open_model(str(out / "model.gguf")).model(ids).logits
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()
    # a tokenizer llama.cpp could not be told how to split is refused before any quantization work
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    code = main(["quantize", "--model", str(model), "--recipe", str(recipe), "--format", "gguf", "--out", str(tmp_path / "m"), *small])
    assert code == 2 and "cannot name this tokenizer's pre-tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("grid, act_order", [(WeightQuant(bits=4, symmetric=True, group_size=32), False),
                                             (WeightQuant(bits=4, symmetric=True, group_size=32, fit="imatrix-mse"), False),
                                             (WeightQuant(bits=8, symmetric=True, granularity="channel"), False),
                                             (WeightQuant(bits=4, symmetric=True, group_size=32), True)])
def test_compressed_tensors_export_loads_in_transformers_with_identical_logits(tmp_path, grid, act_order):
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import write_compressed_tensors

    folder = quantized_folder(tmp_path, [GPTQ(grid, act_order=act_order)])
    model = lowbit.load(folder)
    config = write_compressed_tensors(folder, model, tmp_path / "ct")
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["targets"] == ["Linear"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # compressed-tensors decompresses
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)


def test_compressed_tensors_asymmetric_weights_decompress_exactly(tmp_path):
    """lowbit's asymmetric codes re-expressed for compressed-tensors decompress, with its own decompressor, to
    lowbit's weights exactly (what vLLM would read); the export itself refuses them while transformers cannot load
    them (the next test)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from lowbit.export.compressed_tensors import compressed_state_dict

    model = lowbit.load(quantized_folder(tmp_path, [GPTQ(WeightQuant(bits=4, symmetric=False, group_size=32))]))
    state, config = compressed_state_dict(model)
    scheme = QuantizationScheme(targets=["Linear"], weights=config["config_groups"]["group_0"]["weights"])
    prefix = "model.layers.1.mlp.down_proj."
    local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(weight.float(), model.model.layers[1].mlp.down_proj.dequantized_weight())


def test_asymmetric_compressed_tensors_is_refused_while_transformers_cannot_load_it(tmp_path, capsys, toy_folder):
    """The refusal's premise, checked on the installed versions: transformers + compressed-tensors reject an
    asymmetric pack-quantized checkpoint (the packed zero point as a size mismatch). When an upgrade loads it, this
    test fails: lift the refusal (export/compressed_tensors.py) and test bit-identical logits instead."""
    from transformers import AutoModelForCausalLM

    from lowbit.cli.main import main
    from lowbit.export.compressed_tensors import compressed_state_dict, write_compressed_tensors
    from lowbit.export.hf_folder import write_hf_folder

    folder = quantized_folder(tmp_path, [RTN(WeightQuant(bits=4, symmetric=False, group_size=32))])
    model = lowbit.load(folder)
    state, config = compressed_state_dict(model)
    write_hf_folder(folder, tmp_path / "raw", False, state, config)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "raw", dtype=torch.float32)
    with pytest.raises(LowbitError, match="symmetric grid for this format"):
        write_compressed_tensors(folder, model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    # quantize --format compressed-tensors refuses before any work, naming the symmetric grid point
    source = toy_folder()  # built first: saving it prints progress bars
    capsys.readouterr()
    code = main(["--quiet", "quantize", "--model", str(source), "--recipe", "gptq-w4g64",
                 "--format", "compressed-tensors", "--out", str(tmp_path / "q2")])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe gptq-w4g64-sym" in err and len(err.strip().splitlines()) == 1
    assert resolve_recipe("gptq-w4g64-sym").weight_step.grid.symmetric


@pytest.mark.parametrize("act", ["token", "tensor-static"])
def test_compressed_tensors_w8a8_export_is_int_quantized_and_loads_in_transformers(tmp_path, act):
    """W8A8 goes out as int-quantized: the int8 weights decompress to lowbit's exactly, and transformers +
    compressed-tensors, which fake-quantize the inputs themselves, give lowbit's logits up to the one-step
    difference of their dynamic grid (absmax / 127.5 against lowbit's absmax / 127)."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    from lowbit import ActQuant
    from lowbit.export.compressed_tensors import compressed_state_dict, write_compressed_tensors

    w8 = WeightQuant(bits=8, symmetric=True, granularity="channel")
    acts = ActQuant(8, "token") if act == "token" else ActQuant(8, "tensor", dynamic=False)
    folder = quantized_folder(tmp_path, [RTN(w8), acts])
    model = lowbit.load(folder)
    config = write_compressed_tensors(folder, model, tmp_path / "ct")
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized" and group["targets"] == ["Linear"]
    assert group["input_activations"]["strategy"] == ("token" if act == "token" else "tensor")
    assert group["input_activations"]["dynamic"] == (act == "token")

    state, _ = compressed_state_dict(model)
    prefix = "model.layers.1.mlp.down_proj."
    local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert local["weight"].dtype == torch.int8 and ("input_scale" in local) == (act != "token")
    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    weight = NaiveQuantizationCompressor.decompress(dict(local), scheme)["weight"]
    assert torch.equal(weight.float(), model.model.layers[1].mlp.down_proj.dequantized_weight())

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    weights_only = lowbit.load(quantized_folder(tmp_path, [RTN(w8)], name="w8"))
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        ours, got, unquantized_inputs = model(ids).logits, theirs(ids).logits, weights_only(ids).logits
    assert (got - ours).abs().max() < 0.02 * ours.abs().max()
    if act != "token":  # a static scale is the same number in both: the grids agree but for ties
        assert (got - ours).abs().max() < 0.5 * (unquantized_inputs - ours).abs().max()


def test_compressed_tensors_export_refuses_what_it_cannot_express(tmp_path):
    from lowbit import ActQuant, LLMInt8
    from lowbit.export.compressed_tensors import check_recipe_for_compressed_tensors, write_compressed_tensors

    folder = quantized_folder(tmp_path, [LLMInt8()])
    with pytest.raises(LowbitError, match="LLM.int8"):
        write_compressed_tensors(folder, lowbit.load(folder), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    # desc_act groups (a g_idx): compressed-tensors' decompressor would ignore the g_idx
    folder = quantized_folder(tmp_path, [GPTQ(WeightQuant(bits=4, symmetric=True, group_size=32), act_order=True,
                                              static_groups=False)], name="desc")
    with pytest.raises(LowbitError, match="ignores weight_g_idx"):
        write_compressed_tensors(folder, lowbit.load(folder), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    w8 = RTN(WeightQuant(bits=8, symmetric=True, granularity="channel"))
    with pytest.raises(LowbitError, match="symmetric input quantization only"):
        check_recipe_for_compressed_tensors(lowbit.Recipe(steps=(w8, ActQuant(8, "token", symmetric=False))))


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_compressed_tensors_export_of_a_pruned_model_is_dense_and_loads_with_identical_logits(tmp_path, pattern):
    """compressed-tensors has no sparse storage since 0.15, so pruned Linears go out dense: a plain checkpoint
    that transformers loads with lowbit's logits, the pruned zeros intact."""
    from transformers import AutoModelForCausalLM

    from lowbit import Prune
    from lowbit.export.compressed_tensors import write_compressed_tensors

    folder = quantized_folder(tmp_path, [Prune("magnitude", 0.5 if pattern == "unstructured" else None, pattern)])
    model = lowbit.load(folder)
    assert write_compressed_tensors(folder, model, tmp_path / "ct") is None
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert getattr(theirs.config, "quantization_config", None) is None
    weights = _linear_weights(theirs)
    assert len(weights) == 2 * 7
    for W in weights.values():
        if pattern == "2:4":
            assert torch.equal((W.reshape(W.shape[0], -1, 4) == 0).sum(-1), torch.full((W.shape[0], W.shape[1] // 4), 2))
        else:
            assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)


def test_compressed_tensors_export_of_a_pruned_and_quantized_model_keeps_the_zeros(tmp_path):
    """2:4 pruning then W4: pack-quantized codes hold the pruned zeros exactly (q = 0 on a symmetric grid)."""
    from transformers import AutoModelForCausalLM

    from lowbit import Prune
    from lowbit.export.compressed_tensors import write_compressed_tensors

    grid = WeightQuant(bits=4, symmetric=True, group_size=32)
    folder = quantized_folder(tmp_path, [Prune("wanda", None, "2:4"), GPTQ(grid)])
    model = lowbit.load(folder)
    assert write_compressed_tensors(folder, model, tmp_path / "ct")["format"] == "pack-quantized"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)
    down = model.model.layers[1].mlp.down_proj.dequantized_weight()
    assert torch.equal((down.reshape(down.shape[0], -1, 4) == 0).sum(-1).clamp(max=2), torch.full((down.shape[0], down.shape[1] // 4), 2))


def test_outputs_are_readable_by_other_users_under_the_umask(tmp_path):
    """safetensors writes 0o600 files; a lowbit output (and its compressed-tensors export) takes a plain open()'s
    permissions, so a serving engine running as another user can read it."""
    import os
    import stat

    from lowbit.export.compressed_tensors import write_compressed_tensors

    old = os.umask(0o022)
    try:
        folder = quantized_folder(tmp_path, [RTN(WeightQuant(bits=4, symmetric=True, group_size=32))])
        write_compressed_tensors(folder, lowbit.load(folder), tmp_path / "ct")
    finally:
        os.umask(old)
    files = [p for root in (folder, tmp_path / "ct") for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_compressed_tensors_export_keeps_every_tokenizer_file(tmp_path):
    """A slow (sentencepiece) or BPE tokenizer's vocab.json, merges.txt and tokenizer.model go with the export, as
    they do with lowbit's own output: without them a reader of the export has no tokenizer."""
    from lowbit.export.compressed_tensors import write_compressed_tensors
    from lowbit.io.writer import TOKENIZER_FILES

    folder = quantized_folder(tmp_path, [RTN(WeightQuant(bits=4, symmetric=True, group_size=32))])
    for name in ("vocab.json", "merges.txt", "tokenizer.model"):
        (folder / name).write_text(name)
    write_compressed_tensors(folder, lowbit.load(folder), tmp_path / "ct")
    present = {name for name in TOKENIZER_FILES if (folder / name).exists()}
    assert {"vocab.json", "merges.txt", "tokenizer.model", "tokenizer.json"} <= present
    assert all((tmp_path / "ct" / name).read_bytes() == (folder / name).read_bytes() for name in present)


def gptq_q4_0_gguf(source: torch.nn.Module, tmp_path):  # noqa: ANN201 (lowbit model, gguf.GGUFReader)
    """``source`` quantized by GPTQ W4 symmetric g32 (Q4_0 blocks), saved, loaded back and exported as
    tmp_path/m.gguf: (the loaded lowbit model, a reader of the file)."""
    import gguf

    model = lowbit.quantize(source, [GPTQ(WeightQuant(bits=4, symmetric=True, group_size=32))],
                            calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    write_gguf(tmp_path / "q", loaded, tmp_path / "m.gguf")
    return loaded, gguf.GGUFReader(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_gguf_holds_qwen_architectures(tmp_path, monkeypatch, model_type):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim given): llama.cpp's qwen2 / qwen3 tensors, rows as stored
    (NEOX rope: no permutation), read back by transformers with lowbit's logits."""
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    from transformers import AutoModelForCausalLM, Qwen3Config

    from toy import _COMMON

    torch.manual_seed(0)
    source = toy_model("qwen2") if model_type == "qwen2" else \
        AutoModelForCausalLM.from_config(Qwen3Config(**_COMMON)).eval()  # transformers' GGUF reader ignores
    # key_length and builds Qwen3's default head_dim (128), so the toy has it too; llama.cpp reads key_length
    loaded, reader = gptq_q4_0_gguf(source, tmp_path)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == model_type
    names = {t.name for t in reader.tensors}
    extra = {"blk.0.attn_q.bias", "blk.0.attn_v.bias"} if model_type == "qwen2" else {"blk.0.attn_q_norm.weight"}
    assert extra <= names
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")


def test_gguf_holds_gemma3(tmp_path, monkeypatch):
    """Gemma 3: its four norms per block under llama.cpp's names with 1 added (transformers scales by 1 + weight,
    llama.cpp by the weight), q/k norms, NEOX rows as stored, the sliding window and which layers use it, the local
    rope base; transformers reads the file back with lowbit's logits (non-zero norm weights, so the offset counts)."""
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from toy import _COMMON

    torch.manual_seed(0)
    # 6 layers: transformers' GGUF reader builds the default pattern (every sixth layer global) and query scale
    # (256), which llama.cpp reads from the file and its own rule (1/sqrt(head_dim)); the toy has both
    config = Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 6}, head_dim=256, sliding_window=8)
    source = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    loaded, reader = gptq_q4_0_gguf(source, tmp_path)
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.attention.sliding_window_pattern"].contents() == [
        t == "sliding_attention" for t in config.layer_types]
    assert reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0
    stored = {t.name: t for t in reader.tensors}
    for hf, gg in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                   ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
                   ("self_attn.q_norm", "attn_q_norm")]:
        ours = dict(loaded.named_parameters())[f"model.layers.1.{hf}.weight"].detach()
        assert torch.equal(torch.from_numpy(np.array(stored[f"blk.1.{gg}.weight"].data)), ours + 1)
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")  # 24 tokens: longer than the window of 8


def test_gguf_holds_phi3(tmp_path, monkeypatch):
    """Phi-3: q/k/v in one Linear and gate/up in one, written fused (attn_qkv, ffn_up) as llama.cpp reads them, rows
    as stored (NEOX rope); transformers reads the file back with lowbit's logits."""
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")

    loaded, reader = gptq_q4_0_gguf(toy_model("phi3"), tmp_path)
    assert reader.fields["general.architecture"].contents() == "phi3"
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored["blk.0.attn_qkv.weight"] == stored["blk.0.ffn_up.weight"] == "Q4_0"
    assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & set(stored)
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")


def test_gguf_refuses_a_long_context_phi3(tmp_path, capsys):
    """Phi-3's 128k variants rotate with LongRoPE factors the export does not write: one line, no file."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from lowbit.cli.main import main
    from toy import _COMMON

    dims = _COMMON["hidden_size"] // _COMMON["num_attention_heads"] // 2
    rope = {"rope_type": "longrope", "long_factor": [1.5] * dims, "short_factor": [1.0] * dims,
            "original_max_position_embeddings": 64}
    source = AutoModelForCausalLM.from_config(Phi3Config(**_COMMON, rope_scaling=rope)).eval()
    model = lowbit.quantize(source, [RTN(WeightQuant(bits=4, symmetric=True, group_size=32))], None)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    code = main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "longrope" in err and not (tmp_path / "m.gguf").exists()


def _sentencepiece_folder(tmp_path, vocab: int = 400):
    """A SentencePiece BPE model (byte fallback, a user-defined and a control piece) trained on lowbit's text, saved
    as a Hugging Face tokenizer folder with its tokenizer.model, as Llama 2 / Gemma / Phi-3-mini folders ship it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from lowbit.data.text import DEFAULT_TEXT, documents

    (tmp_path / "text.txt").write_text("\n".join(documents(DEFAULT_TEXT, "calibration")[:200]))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=0.999,
                                   user_defined_symbols=["<tool>"], control_symbols=["<ctrl>"], minloglevel=2)
    tokenizer = LlamaTokenizer(vocab_file=str(tmp_path / "sp.model"))
    return tokenizer, spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def test_gguf_writes_a_sentencepiece_vocabulary_as_llama_cpp_converts_it(tmp_path, monkeypatch):
    """A model with a tokenizer.model (no GGUF source): llama.cpp's "llama" vocabulary built as its converter builds
    it (scores, types, [PAD] rows up to the embedding's size), checked against the sentencepiece library itself, and
    transformers' reader of the file tokenizes text as SentencePiece does."""
    import shutil

    import gguf
    from transformers import AutoTokenizer, LlamaConfig, AutoModelForCausalLM

    from toy import _COMMON

    hf_tokenizer, sp = _sentencepiece_folder(tmp_path)
    rows = sp.vocab_size() + 16  # an embedding larger than the vocabulary, as Llama 2 chat variants pad it
    torch.manual_seed(0)
    config = LlamaConfig(**{**_COMMON, "vocab_size": rows, "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
                            "pad_token_id": None})
    source = AutoModelForCausalLM.from_config(config).eval()
    model = lowbit.quantize(source, [RTN(WeightQuant(bits=4, symmetric=True, group_size=32))], None)
    lowbit.save(model, tmp_path / "q", tokenizer=hf_tokenizer)
    shutil.copy(tmp_path / "sp.model", tmp_path / "q" / "tokenizer.model")
    write_gguf(tmp_path / "q", lowbit.load(tmp_path / "q"), tmp_path / "m.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == rows
    for i in range(sp.vocab_size()):
        kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
        assert (tokens[i], scores[i], types[i]) == (sp.id_to_piece(i), pytest.approx(sp.get_score(i)), kind)
    assert tokens[-1] == f"[PAD{rows - 1}]" and types[-1] == 5 and scores[-1] == -10000.0
    assert fields["tokenizer.ggml.bos_token_id"].contents() == sp.bos_id()
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The river flows north through the old city, 1,234 km in all."
    assert theirs(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_sentencepiece_added_tokens_are_typed_as_llama_cpp_types_them(tmp_path):
    """added_tokens_decoder: control when marked special or looking special (<|...|>), else user-defined with "▁"
    as a space, score -1000; tokenizer.json's added tokens (transformers 5 folders) for ids still normal; the
    folder's add_prefix_space is written (llama.cpp's converter for Llama)."""
    import json

    import gguf

    from lowbit.export.gguf_vocab import gguf_tokenizer
    from lowbit.export.sentencepiece_vocab import CONTROL, USER_DEFINED, sentencepiece_vocab

    hf_tokenizer, sp = _sentencepiece_folder(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    normal = [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))]
    a, b, c, d = normal[-4:]
    config["added_tokens_decoder"] = {str(a): {"content": "<|im_start|>", "special": False},
                                      str(b): {"content": "two\u2581words", "special": False},
                                      str(c): {"content": "<turn>", "special": True}}
    config["add_prefix_space"] = False
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": d, "content": "<start_of_turn>", "special": True})
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    vocab = sentencepiece_vocab(tmp_path / "tok", sp.vocab_size())
    assert [(vocab.tokens[i], vocab.types[i], vocab.scores[i]) for i in (a, b, c, d)] == [
        ("<|im_start|>", CONTROL, -1000.0), ("two words", USER_DEFINED, -1000.0), ("<turn>", CONTROL, -1000.0),
        ("<start_of_turn>", CONTROL, -1000.0)]
    assert vocab.types[0] == 2 and vocab.tokens[0] == sp.id_to_piece(0)  # <unk> stays unknown
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    gguf_tokenizer(tmp_path / "tok", sp.vocab_size()).write(writer, None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf.GGUFReader(str(tmp_path / "t.gguf")).fields["tokenizer.ggml.add_space_prefix"].contents() is False


@pytest.mark.parametrize("change, says", [
    ({"attn_logit_softcapping": 50.0}, "caps attention logits"),
    ({"use_bidirectional_attention": True}, "bidirectionally"),
    ({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar=128"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "sliding_attention layers use 'linear'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "'yarn'"),
])
def test_gguf_refuses_a_gemma3_llama_cpp_would_compute_otherwise(change, says):
    from lowbit.export.gguf_arch import check_config

    config = {"hidden_size": 640, "num_attention_heads": 4, "num_hidden_layers": 18, "head_dim": 256}
    check_config("gemma3_text", config)  # the real Gemma 3 270M's values (defaults left out, as config.json may)
    with pytest.raises(LowbitError, match=says):
        check_config("gemma3_text", {**config, **change})


def test_gguf_writes_gemma3_linear_rope_scaling_of_the_global_layers(tmp_path):
    """Gemma 3 4B+ scale the global layers' rope linearly (factor 8): llama.cpp's rope scaling keys, which its gemma3
    graph applies to the non-sliding layers only."""
    import gguf
    from transformers import Gemma3TextConfig

    from lowbit.export.gguf_arch import add_arch_metadata

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    config = Gemma3TextConfig(num_hidden_layers=6, rope_parameters=rope, final_logit_softcapping=30.0)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "gemma3")
    add_arch_metadata(writer, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(str(tmp_path / "t.gguf")).fields
    assert fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert fields["gemma3.rope.scaling.factor"].contents() == 8.0
    assert fields["gemma3.rope.freq_base"].contents() == 1e6 and fields["gemma3.rope.freq_base_swa"].contents() == 1e4
    assert fields["gemma3.final_logit_softcapping"].contents() == 30.0
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True] * 5 + [False]


def _piece_boundary(model: bytes, pieces: int) -> int:
    """The byte offset after the first ``pieces`` top-level fields of a SentencePiece model (all pieces come first)."""
    def varint(at: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            value, at, shift = value | (model[at] & 0x7F) << shift, at + 1, shift + 7
            if model[at - 1] < 0x80:
                return value, at

    at = 0
    for _ in range(pieces):
        _key, at = varint(at)  # every piece is field 1, length-delimited
        size, at = varint(at)
        at += size
    return at


@pytest.mark.parametrize("spoil", ["truncated mid-piece", "truncated between pieces", "decoder entry",
                                   "decoder id", "added_tokens.json list", "tokenizer_config not json",
                                   "damaged tokenizer.gguf"])
def test_a_damaged_tokenizer_is_refused_in_one_line_and_no_gguf_is_written(tmp_path, capsys, spoil):
    """Every tokenizer file the export reads, damaged: one line, exit 2, no file; never a shorter vocabulary."""
    import json
    import shutil

    from lowbit.cli.main import main

    hf_tokenizer, sp = _sentencepiece_folder(tmp_path)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from toy import _COMMON

    config = LlamaConfig(**{**_COMMON, "vocab_size": sp.vocab_size(), "bos_token_id": sp.bos_id(),
                            "eos_token_id": sp.eos_id(), "pad_token_id": None})
    model = lowbit.quantize(AutoModelForCausalLM.from_config(config).eval(),
                            [RTN(WeightQuant(bits=4, symmetric=True, group_size=32))], None)
    folder = tmp_path / "q"
    lowbit.save(model, folder, tokenizer=hf_tokenizer)
    data = (tmp_path / "sp.model").read_bytes()
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    hf = json.loads((folder / "tokenizer.json").read_text())  # as a Hub folder has it: every piece in the vocabulary
    hf["model"]["vocab"] = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    (folder / "tokenizer.json").write_text(json.dumps(hf))
    if spoil == "truncated mid-piece":
        (folder / "tokenizer.model").write_bytes(data[: _piece_boundary(data, 300) + 3])
    elif spoil == "truncated between pieces":
        (folder / "tokenizer.model").write_bytes(data[: _piece_boundary(data, 300)])
    elif spoil.startswith("decoder"):
        entry = {"5": "not an entry"} if spoil == "decoder entry" else {"five": {"content": "<x>"}}
        (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": entry}))
    elif spoil == "added_tokens.json list":
        (folder / "added_tokens.json").write_text("[1, 2]")
    elif spoil == "tokenizer_config not json":
        (folder / "tokenizer_config.json").write_text("{not json")
    else:  # a kept GGUF tokenizer is read before tokenizer.model
        (folder / "tokenizer.gguf").write_bytes(b"GGUF" + bytes(range(64)))
    capsys.readouterr()
    code = main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lowbit: error:"), err
    assert not (tmp_path / "m.gguf").exists()
