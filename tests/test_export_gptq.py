"""GPTQ checkpoint export: the packed words follow the format's bit layout (checked against the layout written out
from its definition, not against lowbit's packer), every grid decodes back to lowbit's weights exactly, and what
the format cannot hold is refused before any work. (GPTQModel loading the exports with lowbit's logits is checked
in its own environment by bench/peers/check_gptq_export.py.)"""

import json

import pytest
import torch

import lowbit
from lowbit import GPTQ, RTN, ActQuant, WeightQuant
from lowbit.errors import LowbitError
from lowbit.export.gptq_checkpoint import QUANTIZE_CONFIG, check_recipe_for_gptq, gptq_state_dict, pack_int32
from toy import byte_tokenizer, calibration, toy_model


def stream_words(values: list[int], bits: int) -> list[int]:
    """The format's definition: value i at bits [i * bits, (i + 1) * bits) of one little-endian stream, cut into
    32-bit words, each read as a signed int32."""
    stream = sum(v << (i * bits) for i, v in enumerate(values))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(len(values) * bits // 32)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_the_formats_bit_stream(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 64), generator=generator, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 64 * bits // 32)
    for row in range(3):
        assert packed[row].tolist() == stream_words(codes[row].tolist(), bits)
    # 3 bits: value 10 straddles words 0 and 1 (its low 2 bits at shift 30), as GPTQ's 3-bit layout has it
    if bits == 3:
        value10 = int(codes[0, 10])
        word0, word1 = (w & 0xFFFFFFFF for w in packed[0, :2].tolist())
        assert (word0 >> 30) | ((word1 & 1) << 2) == value10


def decode(tensors: dict, prefix: str, config: dict) -> torch.Tensor:
    """W [out, in] from one Linear's GPTQ tensors and the quantize config, following the format's definition value
    by value; without desc_act a reader takes each column's group from the config's group size, not g_idx."""
    bits, v2 = config["bits"], config["checkpoint_format"] == "gptq_v2"
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, n_in = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].numel()
    n_out = scales.shape[1]
    if config["desc_act"]:
        g_idx = tensors[f"{prefix}.g_idx"].long()
    else:
        g_idx = torch.arange(n_in) // (config["group_size"] if config["group_size"] > 0 else n_in)

    def unstream(words: torch.Tensor, n: int) -> torch.Tensor:  # int32 [k] -> n values
        stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words.tolist()))
        return torch.tensor([(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(n)])

    q = torch.stack([unstream(qweight[:, o], n_in) for o in range(n_out)], dim=1)  # [in, out]
    z = torch.stack([unstream(qzeros[g], n_out) for g in range(qzeros.shape[0])])  # [groups, out]
    z = z if v2 else z + 1
    return (scales[g_idx] * (q - z[g_idx]).float()).T


GRIDS = {
    "w4-asym-g32": (GPTQ(WeightQuant(4, False, "group", 32)),),
    "w4-sym-g32": (GPTQ(WeightQuant(4, True, "group", 32)),),
    "w3-asym-g32": (GPTQ(WeightQuant(3, False, "group", 32)),),
    "w2-asym-g32": (RTN(WeightQuant(2, False, "group", 32)),),
    "w8-sym-channel": (RTN(WeightQuant(8, True, "channel")),),
    "w4-desc-act": (GPTQ(WeightQuant(4, False, "group", 32), act_order=True, static_groups=False),),
}


@pytest.fixture(scope="module")
def quantized_models():
    return {name: lowbit.quantize(toy_model("llama"), recipe, calibration(n=4, length=32), batch_size=2)
            for name, recipe in GRIDS.items()}


@pytest.mark.parametrize("name", list(GRIDS))
def test_every_grid_decodes_to_lowbits_weights_exactly(quantized_models, name):
    model = quantized_models[name]
    state, config = gptq_state_dict(model)
    grid = GRIDS[name][0].weights
    assert config["bits"] == grid.bits and config["sym"] == grid.symmetric and config["quant_method"] == "gptq"
    assert config["group_size"] == (grid.group_size if grid.granularity == "group" else -1)
    assert config["checkpoint_format"] == ("gptq" if grid.symmetric else "gptq_v2")
    assert config["desc_act"] == (name == "w4-desc-act")
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(prefix)
        expected = module.dequantized_weight()
        assert torch.equal(decode(state, prefix, config), expected), prefix
        assert state[f"{prefix}.bias"].shape == module.bias.shape  # the toy Llama's Linears have biases
        assert f"{prefix}.weight" not in state
    if grid.symmetric and grid.bits == 4:  # v1's symmetric zero, as every GPTQ reader expects it: 7 per nibble
        assert set(state["model.layers.0.self_attn.q_proj.qzeros"].flatten().tolist()) == {0x77777777}
    assert "model.embed_tokens.weight" in state and "model.norm.weight" in state


def test_the_cli_writes_a_loadable_folder_and_refuses_what_the_format_cannot_hold(tmp_path, capsys):
    from lowbit.cli.main import main

    model = lowbit.quantize(toy_model("llama"), GRIDS["w4-asym-g32"], calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    assert main(["export", str(tmp_path / "q"), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    written = json.loads((tmp_path / "g" / QUANTIZE_CONFIG).read_text())
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"] == written
    assert (tmp_path / "g" / "model.safetensors").exists() and (tmp_path / "g" / "tokenizer.json").exists()
    # W8A8 cannot be held: one line, exit 2, nothing written
    w8a8 = lowbit.quantize(toy_model("llama"), (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")),
                           calibration(n=4, length=32), batch_size=2)
    lowbit.save(w8a8, tmp_path / "a", tokenizer=byte_tokenizer())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and "quantizes its inputs" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe, message", [
    ((RTN(WeightQuant(5, False, "group", 32)),), "not 5-bit"),
    ((RTN(WeightQuant(4, True, "tensor")),), "per-tensor"),
    ((RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")), "activation quantization"),
    ((lowbit.Prune("magnitude", 0.5),), "rounds none"),
])
def test_recipes_the_format_cannot_hold_are_refused_before_any_work(recipe, message):
    with pytest.raises(LowbitError, match=message):
        check_recipe_for_gptq(lowbit.Recipe(steps=recipe))
    outside = lowbit.Recipe(steps=GRIDS["w4-asym-g32"], embeddings=WeightQuant(6, False, "group", 32))
    with pytest.raises(LowbitError, match="no quantized embedding"):
        check_recipe_for_gptq(outside)


def test_mixed_grids_and_odd_widths_are_refused_naming_the_fix():
    from lowbit.export.gptq_checkpoint import gptq_module
    from lowbit.numerics.rtn import rtn

    weight = torch.randn(48, 40)  # 40 input columns: not a multiple of 32, which 3-bit packing needs
    with pytest.raises(LowbitError, match="not a multiple of 32"):
        gptq_module("x", rtn(weight, WeightQuant(3, False, "group", 8)), v2=True)
    assert gptq_module("x", rtn(weight, WeightQuant(4, False, "group", 8)), v2=True)["qweight"].shape == (5, 48)
    model = lowbit.quantize(toy_model("llama"), GRIDS["w4-asym-g32"], calibration(n=4, length=32), batch_size=2)
    other = lowbit.quantize(toy_model("llama"), GRIDS["w3-asym-g32"], calibration(n=4, length=32), batch_size=2)
    model.model.layers[1] = other.model.layers[1]  # one block on another grid
    with pytest.raises(LowbitError, match="mixes"):
        gptq_state_dict(model)


def test_quantize_with_gptq_format_checks_the_recipe_first_and_writes_the_folder(tmp_path, capsys):
    from lowbit.cli.main import main
    from toy import save_toy, write_corpus

    model, corpus = save_toy("llama", tmp_path / "toy"), write_corpus(tmp_path / "c.txt")
    small = ["--calib", str(corpus), "--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]
    code = main(["quantize", "--model", str(model), "--recipe", "w8a8-token", "--format", "gptq", "--out",
                 str(tmp_path / "bad"), *small])
    assert code == 2 and "activation quantization" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "ok"
    assert main(["quantize", "--model", str(model), "--recipe", "gptq-w4g32", "--format", "gptq", "--out", str(out),
                 *small]) == 0
    config = json.loads((out / "gptq" / QUANTIZE_CONFIG).read_text())
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, False)
    from safetensors.torch import load_file

    state, loaded = load_file(out / "gptq" / "model.safetensors"), lowbit.load(out)
    prefix = "model.layers.0.mlp.up_proj"
    assert torch.equal(decode(state, prefix, config), loaded.get_submodule(prefix).dequantized_weight())


def test_v1_stores_zero_minus_1_and_asymmetric_zeros_of_0_go_out_exactly_as_v2():
    """v1 stores zero - 1 (the layout every GPTQ reader knows) and cannot hold a zero of 0; asymmetric grids, which
    can have one, go out as v2, which stores zeros as they are."""
    from lowbit.export.gptq_checkpoint import gptq_module
    from lowbit.numerics.rtn import rtn

    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    grid = WeightQuant(4, False, "group", 32)
    qweight = rtn(weight, grid)
    assert bool((qweight.zero > 0).all())
    v1 = gptq_module("x", qweight, v2=False)["qzeros"]
    assert v1[0].tolist() == stream_words((qweight.zero[:, 0] - 1).tolist(), 4)
    float_model = toy_model("llama")
    with torch.no_grad():
        for module in float_model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.abs_()  # every group's minimum >= 0: round-to-nearest gives zero points of 0
    model = lowbit.quantize(float_model, (RTN(grid),), None)
    state, config = gptq_state_dict(model)
    assert config["checkpoint_format"] == "gptq_v2"
    prefix = "model.layers.0.mlp.up_proj"
    assert bool((model.get_submodule(prefix).unpacked().zero == 0).any())
    assert torch.equal(decode(state, prefix, config), model.get_submodule(prefix).dequantized_weight())


def test_mixture_of_experts_keeps_routers_float_and_refuses_asymmetric_experts():
    """Routers stay float Linears (lowbit never quantizes them) and are written as such; an asymmetric grid is
    refused, since vLLM's GPTQ expert kernels read experts as symmetric whatever the checkpoint says."""
    symmetric = lowbit.quantize(toy_model("qwen2_moe"), GRIDS["w4-sym-g32"], calibration(n=4, length=32),
                                batch_size=2)
    state, config = gptq_state_dict(symmetric)
    assert config["sym"] and config["checkpoint_format"] == "gptq"
    assert any(name.endswith("shared_expert_gate.weight") for name in state)  # the float router
    assert any(".experts." in name and name.endswith(".qweight") for name in state)
    asymmetric = lowbit.quantize(toy_model("qwen2_moe"), GRIDS["w4-asym-g32"], calibration(n=4, length=32),
                                 batch_size=2)
    with pytest.raises(LowbitError, match="mixture-of-experts"):
        gptq_state_dict(asymmetric)
