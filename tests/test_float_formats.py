"""Float grids (FP8, MXFP4, NVFP4): lowbit's rounding is compressed-tensors' reference rounding bit for bit, the
packed form is the fake-quant one exactly, GPTQ beats round-to-nearest on them, the schemes run end to end, and
their compressed-tensors exports load in transformers with lowbit's weights and logits."""

import pytest
import torch

import lowbit
from lowbit import GPTQ, RTN, WeightQuant
from lowbit.errors import LowbitError
from lowbit.methods.act_quant import ActQuant
from lowbit.numerics.float_formats import (
    FLOAT_TYPES, abs_max, element_codes, element_values, global_scale, mx_exponents, round_e2m1_, round_e4m3_,
)
from lowbit.numerics.float_quant import FloatQWeight, float_rtn, quantize_float_inputs
from lowbit.numerics.obs import gptq
from lowbit.presets import resolve_recipe
from lowbit.recipe import Recipe
from toy import byte_tokenizer, calibration, random_weight, toy_model

SCHEMES = ["fp8", "fp8-dynamic", "nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4"]


def _ct_fake_quant(W: torch.Tensor, preset: str, kind: str) -> torch.Tensor:
    """compressed-tensors' own fake quantization of W [out, in] under its preset scheme."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = preset_name_to_scheme(preset, ["Linear"]).weights
    block = FLOAT_TYPES[kind].block
    if not block:  # FP8_DYNAMIC: per channel
        scale, zero = calculate_qparams(W.amin(-1, keepdim=True), W.amax(-1, keepdim=True), args)
        return fake_quantize(W, scale, zero, args)
    Wg = W.view(W.shape[0], -1, block)
    g = generate_gparam(W.min(), W.max()) if kind == "NVFP4" else None
    scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args, global_scale=g)
    return fake_quantize(W, scale, zero, args, global_scale=g)


def test_e2m1_rounding_and_mx_exponents_are_the_references():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    ft = FLOAT_TYPES["MXFP4"]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -2.5, 6.5, -100.0])
    assert element_values(element_codes(ties, ft), ft).tolist() == [0, 1, 1, 2, 2, 4, 4, -1, -2, 6, -6]
    x = torch.randn(50_000) * 4
    assert torch.equal(element_values(element_codes(x, ft), ft), cast_to_fp4(x.clone()))
    absmax = torch.rand(10_000) * 10 + 1e-3
    assert torch.equal(mx_exponents(absmax) + 127, generate_mx_scales(absmax).to(torch.int32))


def test_run_time_rounding_is_the_codes_values_bit_for_bit():
    """Inputs are rounded by arithmetic on the float32 bits (round_e2m1_, round_e4m3_) and their block ranges taken
    without an |x| tensor (abs_max): the same bits as the codes' values and x.abs().amax, ties, signed zeros,
    subnormals, saturation and extremes included."""
    ft = FLOAT_TYPES["MXFP4"]
    x = torch.cat([torch.linspace(-10, 10, 400_001), torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e9, 3e38, 0.0, -0.0, 1e-40, -1e-40, -0.25, -5.0, -3e38])])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(float("inf"))), torch.nextafter(x, torch.tensor(float("-inf")))])
    reference = element_values(element_codes(x, ft), ft)
    assert torch.equal(round_e2m1_(x.clone()).view(torch.int32), reference.view(torch.int32))
    fp8 = FLOAT_TYPES["FP8"]  # E4M3: subnormals below 2^-6, saturating at 448, -0 kept as the cast keeps it
    wide = torch.cat([x * 50, x / 200, x / 5e4, torch.tensor([448.0, 464.0, 465.0, 480.0, 2.0**-10, -(2.0**-10)])])
    reference = element_values(element_codes(wide, fp8), fp8)
    assert torch.equal(round_e4m3_(wide.clone()).view(torch.int32), reference.view(torch.int32))
    for block in (16, 32):  # NVFP4's, MXFP4's
        blocks = torch.cat([x[:32_000], -x[:32_000].abs(), torch.zeros(160)]).view(-1, 5, block)
        assert torch.equal(abs_max(blocks).view(torch.int32), blocks.abs().amax(dim=-1).view(torch.int32))
        assert abs_max(blocks, keepdim=True).shape == (blocks.shape[0], 5, 1)


@pytest.mark.parametrize("preset, kind, group", [("FP8_DYNAMIC", "FP8", 256), ("MXFP4A16", "MXFP4", 32),
                                                 ("NVFP4A16", "NVFP4", 16)])
def test_round_to_nearest_is_compressed_tensors_bit_for_bit_and_packs_exactly(preset, kind, group):
    W = random_weight(64, 256)
    W[3, 5] = 40.0  # an outlier: NVFP4's tensor scale and one group's scale follow it
    q = float_rtn(W, kind, group)
    assert torch.equal(q.dequantize(), _ct_fake_quant(W, preset, kind).float())
    back = FloatQWeight.unpack(q.pack(), kind, group, W.shape[1])
    assert torch.equal(back.dequantize(), q.dequantize()) and torch.equal(back.codes, q.codes)
    assert q.pack()["qweight"].numel() == W.numel() * FLOAT_TYPES[kind].bits // 8


def test_float_inputs_follow_their_formats():
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 20, 64)
    fp8 = quantize_float_inputs(x, FLOAT_TYPES["FP8"], per_token=True)
    step = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(fp8, (x / step).to(torch.float8_e4m3fn).float() * step)
    static = quantize_float_inputs(x, FLOAT_TYPES["FP8"], per_token=False, static_scale=torch.tensor(0.05))
    assert torch.equal(static, (x / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.05)
    rows = x.reshape(-1, 64)  # the tokens as the rows of a weight: each block of each token rounded on its own
    for kind in ("MXFP4", "NVFP4"):
        ft = FLOAT_TYPES[kind]
        global_ = global_scale(x.abs().amax()) if kind == "NVFP4" else None  # as calibrated on x itself
        q = quantize_float_inputs(x, ft, global_=global_)
        assert torch.equal(q.reshape(-1, 64), float_rtn(rows, kind, ft.block).dequantize())


@pytest.mark.parametrize("kind", ["FP8", "MXFP4", "NVFP4"])
def test_gptq_beats_round_to_nearest_on_float_grids(kind):
    torch.manual_seed(0)
    mix = torch.randn(256, 256) / 16
    X = torch.randn(4096, 256) @ (torch.eye(256) + mix) * torch.linspace(0.2, 3, 256)  # correlated inputs
    H = X.T @ X
    W = random_weight(128, 256)
    spec = WeightQuant.float_grid(kind)

    def error(W_hat: torch.Tensor) -> float:
        return float(((X @ (W_hat - W).T) ** 2).mean())

    result = gptq(W, H.clone(), spec)
    assert isinstance(result.qweight, FloatQWeight) and torch.equal(result.weight, result.qweight.dequantize())
    assert error(result.qweight.dequantize()) < 0.9 * error(float_rtn(W, kind, spec.group_size if kind != "FP8" else 256).dequantize())


@pytest.mark.parametrize("name", [*SCHEMES, "gptq-nvfp4a16", "awq-mxfp4a16", "gptq-fp8-dynamic-actorder"])
def test_float_schemes_round_trip_through_lowbit_checkpoints(tmp_path, name):
    recipe = resolve_recipe(name)
    model = lowbit.quantize(toy_model("llama"), recipe, calibration(n=4, length=32), batch_size=2)
    ids = calibration(n=2, length=24, seed=5)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    back = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    down = back.model.layers[1].mlp.down_proj
    assert type(down).__name__ == "FloatQuantLinear" and down.float_type == recipe.weight_step.grid.float_type
    assert bool(down.input_type) == recipe.quantizes_inputs
    if down.float_type == "NVFP4":  # servers fuse q/k/v and gate/up under one tensor scale (vLLM takes the largest)
        layer = back.model.layers[0]
        for fused in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                      (layer.mlp.gate_proj, layer.mlp.up_proj)):
            assert all(torch.equal(m.fglobal, fused[0].fglobal) for m in fused)
        assert not torch.equal(layer.self_attn.o_proj.fglobal, layer.self_attn.q_proj.fglobal)


@pytest.mark.parametrize("name", SCHEMES)
def test_compressed_tensors_float_exports_load_in_transformers(tmp_path, name):
    """FP8 decompresses to lowbit's weights exactly and gives its logits (static and per-token inputs included);
    transformers + compressed-tensors 0.20 decompress the FP4 formats in bfloat16 only (a float32 model fails in
    their Linear), so those are read back in bfloat16: MXFP4's power-of-two steps are exact there, NVFP4's
    scale / global is rounded to bfloat16 by the reader; the stored tensors decode to lowbit's float32 weights
    exactly with compressed-tensors' own unpacking."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import compressed_state_dict, write_compressed_tensors

    recipe = resolve_recipe(name)
    model = lowbit.quantize(toy_model("llama"), recipe, calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    model = lowbit.load(tmp_path / "q")
    config = write_compressed_tensors(tmp_path / "q", model, tmp_path / "ct")
    kind = recipe.weight_step.grid.float_type
    assert config["format"] == {"FP8": "float-quantized", "NVFP4": "nvfp4-pack-quantized",
                                "MXFP4": "mxfp4-pack-quantized"}[kind]
    ours_down = model.model.layers[1].mlp.down_proj.dequantized_weight()
    state, _ = compressed_state_dict(model)
    prefix = "model.layers.1.mlp.down_proj."
    if kind != "FP8":
        out, n = ours_down.shape
        values = unpack_fp4_from_uint8(state[prefix + "weight_packed"], out, n, dtype=torch.float32)
        scale = state[prefix + "weight_scale"]
        step = (scale.float() / state[prefix + "weight_global_scale"] if kind == "NVFP4"
                else torch.exp2(scale.to(torch.int32).float() - 127))
        assert torch.equal(values * step.repeat_interleave(FLOAT_TYPES[kind].block, dim=1), ours_down)
    dtype = torch.float32 if kind == "FP8" else torch.bfloat16
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=dtype)
    ours = lowbit.load(tmp_path / "q", dtype=dtype)
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        got, expected = theirs(ids).logits.float(), ours(ids).logits.float()
    if kind == "NVFP4":
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    else:
        assert torch.equal(theirs.model.layers[1].mlp.down_proj.weight.float(), ours_down)
        assert torch.equal(got, expected)


def test_float_grids_refuse_what_they_cannot_hold(tmp_path, capsys):
    from lowbit.cli.main import main

    with pytest.raises(LowbitError, match="NVFP4 is bits=4, symmetric=true, granularity=\"group\", group_size=16"):
        WeightQuant(bits=4, symmetric=True, group_size=32, float_type="NVFP4")
    with pytest.raises(LowbitError, match="float_type must be one of"):
        Recipe.from_dict({"steps": [{"type": "rtn", "float_type": "FP6"}]})
    with pytest.raises(LowbitError, match="NVFP4 inputs need weights on the same kind of grid"):
        Recipe([RTN(WeightQuant(bits=4, symmetric=True, group_size=16)), ActQuant(4, float_type="NVFP4")])
    with pytest.raises(LowbitError, match="integer inputs need weights on the same kind of grid"):
        Recipe([RTN(WeightQuant.float_grid("FP8")), ActQuant(8)])
    with pytest.raises(LowbitError, match="float grids are for the blocks' Linears"):
        Recipe([RTN(WeightQuant.float_grid("MXFP4"))], embeddings=WeightQuant.float_grid("MXFP4"))
    with pytest.raises(LowbitError, match="NVFP4 needs widths divisible by 16"):
        float_rtn(random_weight(8, 40), "NVFP4", 16)
    with pytest.raises(LowbitError, match="same grid"):
        Recipe([lowbit.AWQ(WeightQuant(bits=4, symmetric=True, group_size=16)), GPTQ(WeightQuant.float_grid("NVFP4"))])
    grouped_fp8 = Recipe([RTN(WeightQuant(bits=8, symmetric=True, group_size=32, float_type="FP8"))])
    from lowbit.export.compressed_tensors import write_compressed_tensors

    folder = tmp_path / "g"
    lowbit.save(lowbit.quantize(toy_model("llama"), grouped_fp8, None), folder, tokenizer=byte_tokenizer())
    with pytest.raises(LowbitError, match="vLLM's FP8 kernels read one scale per tensor or per channel"):
        write_compressed_tensors(folder, lowbit.load(folder), tmp_path / "g-ct")
    assert not (tmp_path / "g-ct").exists()
    for fmt in ("gguf", "gptq"):
        with pytest.raises(LowbitError, match=f"float grid, which {fmt.upper()} cannot hold"):
            resolve_recipe("gptq-nvfp4a16").check_export(fmt)
    model = tmp_path / "toy"
    from toy import save_toy

    save_toy("llama", model, biases=False)
    capsys.readouterr()  # transformers' progress bar while saving the toy
    code = main(["quantize", "--model", str(model), "--recipe", "mxfp4a16", "--format", "gptq", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "float grid" in err and not (tmp_path / "m").exists()
