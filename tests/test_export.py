"""GGUF export: lowbit's integer weights land in Q8_0 / Q4_0 / Q4_1 blocks exactly, transformers loads the file
with the same logits as lowbit's own loader, and grids GGUF cannot hold are refused before anything is written."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit import RTN, GPTQ, WeightQuant
from lowbit.errors import LowbitError
from lowbit.export.gguf import permute_rows, write_gguf
from lowbit.models.open import open_model
from toy import byte_tokenizer, calibration, toy_model


def quantized_folder(tmp_path, recipe, name="q"):
    model = lowbit.quantize(toy_model("llama"), recipe, calibration(n=4, length=32), batch_size=2)
    folder = tmp_path / name
    lowbit.save(model, folder, tokenizer=byte_tokenizer())
    return folder


@pytest.mark.parametrize(
    "grid, kind",
    [(WeightQuant(bits=8, symmetric=True, group_size=32), "Q8_0"), (WeightQuant(bits=4, symmetric=True, group_size=32), "Q4_0"),
     (WeightQuant(bits=4, symmetric=False, group_size=32), "Q4_1")],
)
def test_gguf_blocks_hold_lowbit_weights_and_transformers_loads_them(tmp_path, grid, kind):
    import gguf

    folder = quantized_folder(tmp_path, [GPTQ(grid)])
    model = lowbit.load(folder)
    out = tmp_path / "m.gguf"
    types = write_gguf(folder, model, out)
    assert set(types.values()) == {kind} and len(types) == 2 * 7
    reader = gguf.GGUFReader(str(out))
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
        act_order = quantized_folder(tmp_path, [GPTQ(WeightQuant(bits=4, group_size=32), act_order=True)], "a")
        write_gguf(act_order, lowbit.load(act_order), tmp_path / "a.gguf")


def test_permutation_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(64, 8)
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 4).numpy(), 4, 4)
    assert np.array_equal(back, w.numpy())


def test_quantize_with_gguf_format_checks_the_recipe_first_and_writes_the_file(tmp_path, capsys):
    import json

    from lowbit.cli.main import main
    from toy import save_toy, write_corpus

    model, corpus = save_toy("llama", tmp_path / "toy"), write_corpus(tmp_path / "c.txt")
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


@pytest.mark.parametrize("grid", [WeightQuant(bits=4, symmetric=True, group_size=32), WeightQuant(bits=8, symmetric=True, granularity="channel")])
def test_compressed_tensors_export_loads_in_transformers_with_identical_logits(tmp_path, grid):
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import write_compressed_tensors

    folder = quantized_folder(tmp_path, [GPTQ(grid)])
    model = lowbit.load(folder)
    config = write_compressed_tensors(folder, model, tmp_path / "ct")
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["targets"] == ["Linear"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # compressed-tensors decompresses
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)


def test_compressed_tensors_asymmetric_weights_decompress_exactly(tmp_path):
    """transformers 5.23 + compressed-tensors 0.20 size the zero point unpacked at load but unpack it when
    decompressing, so asymmetric checkpoints are checked with compressed-tensors' own decompressor."""
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
    w8 = RTN(WeightQuant(bits=8, symmetric=True, granularity="channel"))
    with pytest.raises(LowbitError, match="symmetric input quantization only"):
        check_recipe_for_compressed_tensors(lowbit.Recipe(steps=(w8, ActQuant(8, "token", symmetric=False))))
