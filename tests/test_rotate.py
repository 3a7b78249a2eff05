"""Rotation of the residual stream (methods/rotate.py, pipeline/rotate.py, numerics/rotation.py): the rotated model
computes the same function in float on every architecture it accepts (tied heads untied, non-zero biases and norm
weights), in memory and through a checkpoint; architectures it cannot pass are refused in one line; and it spreads
outlier channels so that per-token activation grids lose less."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.errors import LowbitError
from lowbit.numerics.rotation import hadamard, residual_rotation
from lowbit.presets import resolve_recipe
from lowbit.recipe import RTN, ActQuant, Recipe, Rotate, WeightQuant
from toy import OUTLIER_CHANNELS, calibration, save_toy, toy_model

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite", "mixtral", "qwen2_moe", "qwen3_moe",
             "olmoe", "deepseek_v3")
W8 = WeightQuant(bits=8, symmetric=True, granularity="channel")
ROTATE_ONLY = Recipe(steps=(Rotate(seed=1),))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("width", [64, 96, 576, 896, 1536])
def test_residual_rotation_is_orthogonal_dense_and_reproducible(width):
    q = residual_rotation(width, 3)
    assert torch.allclose(q @ q.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert (q != 0).float().mean() > 0.99  # every channel spread over (almost) all
    residual_rotation.cache_clear()
    assert torch.equal(residual_rotation(width, 3), q)
    assert not torch.equal(residual_rotation(width, 4), q)


def test_hadamard_refuses_orders_that_are_not_powers_of_two():
    assert torch.allclose(hadamard(8) @ hadamard(8).T, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError):
        hadamard(12)


@pytest.mark.parametrize("model_type", ROTATABLE)
def test_rotation_leaves_the_float_model_unchanged(model_type):
    model = toy_model(model_type)
    ids, test = calibration(4, 32), calibration(2, 40, seed=1)
    expected = logits(model, test)
    tied = model.config.tie_word_embeddings
    rotated = lowbit.quantize(model, ROTATE_ONLY, ids, batch_size=2)
    assert relative(logits(rotated, test), expected) < 2e-6
    assert not rotated.config.tie_word_embeddings
    if tied:  # the head is a tensor of its own now: E diag(g) Q is not E Q
        assert rotated.get_output_embeddings().weight is not rotated.get_input_embeddings().weight
    folds = [f for b in rotated.lowbit_info.report.blocks for f in b.folds]
    assert folds and all(f.method == "rotate" and f.applied and f.change < 1e-4 for f in folds)


def test_rotation_moves_the_residual_stream_off_its_outlier_channels():
    model = toy_model("llama")
    ids = calibration(4, 32)
    embedding = model.get_input_embeddings().weight.detach().clone()
    share = lambda e: (e[:, OUTLIER_CHANNELS].pow(2).sum() / e.pow(2).sum()).item()  # noqa: E731
    rotated = lowbit.quantize(model, ROTATE_ONLY, ids, batch_size=2)
    # 3 of 64 channels held most of the energy; rotated, they hold about their 3/64 share of it
    assert share(embedding) > 0.8 and share(rotated.get_input_embeddings().weight) < 0.15


@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # an untied and a tied head
def test_a_rotated_checkpoint_equals_the_rotated_model_in_memory(model_type, tmp_path):
    source = save_toy(model_type, tmp_path / "src")
    ids, test = calibration(4, 32), calibration(2, 40, seed=1)
    expected = logits(toy_model(model_type), test)
    for name, steps in (("float", (Rotate(seed=1),)), ("w8", (Rotate(seed=1), RTN(W8)))):
        quantize_checkpoint(source, Recipe(steps=steps), ids, tmp_path / name, batch_size=2, progress=False)
        loaded = lowbit.load(tmp_path / name)
        in_memory = lowbit.quantize(toy_model(model_type), Recipe(steps=steps), ids, batch_size=2)
        assert torch.equal(logits(loaded, test), logits(in_memory, test))
        assert not loaded.config.tie_word_embeddings
        if name == "float":
            assert relative(logits(loaded, test), expected) < 2e-6


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "cohere"])
def test_blocks_a_rotation_cannot_pass_end_the_run_in_one_line(model_type):
    with pytest.raises(LowbitError, match="does not compute the same function on a rotated stream"):
        lowbit.quantize(toy_model(model_type), ROTATE_ONLY, calibration(4, 32), batch_size=2)


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "starcoder2"])
def test_layernorm_models_are_refused_before_any_work(model_type):
    model = toy_model(model_type)
    embedding = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(LowbitError, match="does not commute with a rotation"):
        lowbit.quantize(model, ROTATE_ONLY, calibration(4, 32), batch_size=2)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # refused before the embedding was rotated


def test_rotation_spreads_outliers_for_per_token_activation_grids():
    """W8 weights with 4-bit per-token inputs: the toy's 30x embedding channels take the whole grid unrotated."""
    ids, test = calibration(8, 32), calibration(2, 40, seed=1)
    expected = logits(toy_model("llama"), test)
    steps = (RTN(W8), ActQuant(bits=4, granularity="token"))
    plain = relative(logits(lowbit.quantize(toy_model("llama"), Recipe(steps=steps), ids, batch_size=4), test), expected)
    rotated = relative(logits(lowbit.quantize(toy_model("llama"), Recipe(steps=(Rotate(), *steps)), ids, batch_size=4),
                              test), expected)
    assert rotated < 0.7 * plain, (rotated, plain)


def test_rotate_recipes_compose_and_refuse_what_they_cannot_hold():
    recipe = resolve_recipe("rotate-gptq-w4a8")
    assert [s.kind for s in recipe.steps] == ["rotate", "gptq", "act_quant"] and recipe.name == "rotate-gptq-w4a8"
    assert [s.kind for s in resolve_recipe("rotate-smoothquant-w8a8").block_transforms] == ["rotate", "smoothquant"]
    for name, message in (("rotate-w4g128-e8", "embeddings"), ("rotate-gptq-w4g128-b3.5", "budget"),
                          ("rotate-rotate-w4a8", "one rotate step"), ("rotate-x.json", "not a file")):
        with pytest.raises(LowbitError, match=message):
            resolve_recipe(name)
    with pytest.raises(LowbitError, match="out of order"):
        Recipe(steps=(RTN(W8), Rotate()))
    from lowbit.cli.compare_cmd import recipe_description

    assert recipe_description("quarot-gptq-w4a4", resolve_recipe("quarot-gptq-w4a4")).startswith(
        "residual stream and o_proj/down_proj inputs rotated (QuaRot), then GPTQ INT4")
    with pytest.raises(LowbitError, match="needs calibration"):
        lowbit.quantize(toy_model("llama"), ROTATE_ONLY, None)


def test_rotation_then_smoothquant_keeps_the_float_model():
    """A rotation composes with a scale transform after it: both folds proven, the function unchanged."""
    from lowbit.recipe import SmoothQuant

    model = toy_model("qwen2")
    ids, test = calibration(4, 32), calibration(2, 40, seed=1)
    expected = logits(model, test)
    rotated = lowbit.quantize(model, Recipe(steps=(Rotate(), SmoothQuant(0.5))), ids, batch_size=2)
    assert relative(logits(rotated, test), expected) < 1e-5
    methods = {f.method for b in rotated.lowbit_info.report.blocks for f in b.folds if f.applied}
    assert methods == {"rotate", "smoothquant"}


@pytest.mark.parametrize("model_type", ["qwen2", "gemma"])  # q/k/v biases; a tied head that rotation unties
def test_a_rotated_model_exports_to_compressed_tensors_and_transformers_gives_its_logits(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import write_compressed_tensors
    from lowbit.recipe import GPTQ
    from toy import byte_tokenizer

    grid = WeightQuant(bits=4, symmetric=True, group_size=32)
    model = lowbit.quantize(toy_model(model_type), Recipe(steps=(Rotate(), GPTQ(grid))), calibration(4, 32),
                            batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    write_compressed_tensors(tmp_path / "q", loaded, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    test = calibration(2, 24, seed=5)
    assert not theirs.config.tie_word_embeddings
    assert torch.equal(logits(theirs, test), logits(loaded, test))


def test_scales_searched_after_a_rotation_are_reapplied_only_to_the_same_rotation(tmp_path):
    from lowbit.cli.compare_cmd import transform_step
    from lowbit.recipe import SmoothQuant
    from toy import byte_tokenizer

    ids, test = calibration(4, 32), calibration(2, 40, seed=1)
    rotated = Recipe(steps=(Rotate(seed=2), SmoothQuant(0.5), RTN(W8)))
    model = lowbit.quantize(toy_model("llama"), rotated, ids, batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    again = lowbit.quantize(toy_model("llama"), rotated.reusing_transforms(str(tmp_path / "q")), ids, batch_size=2)
    assert torch.equal(logits(again, test), logits(model, test))
    for other in (Recipe(steps=(SmoothQuant(0.5), RTN(W8))), Recipe(steps=(Rotate(seed=3), SmoothQuant(0.5), RTN(W8)))):
        with pytest.raises(LowbitError, match="searched on a model rotated with seed 2"):
            lowbit.quantize(toy_model("llama"), other.reusing_transforms(str(tmp_path / "q")), ids, batch_size=2)
    # `lowbit compare` never hands a rotated row's scales to an unrotated one (or back)
    assert transform_step(rotated) is None and transform_step(Recipe(steps=(SmoothQuant(0.5), RTN(W8)))) is not None


def test_structured_rotation_equals_the_dense_matrix():
    from lowbit.numerics.rotation import rotate_last_dim, rotation_factors, walsh_hadamard

    x = torch.randn(3, 64, 5, dtype=torch.float64)  # along dim -2
    assert torch.allclose(walsh_hadamard(x), hadamard(64) @ x, atol=1e-12)  # Sylvester's order
    for width in (64, 96, 1536, 4864):
        signs, mix = rotation_factors(width, 5)
        x = torch.randn(2, 7, width, dtype=torch.float64)
        assert torch.allclose(rotate_last_dim(x, signs, mix), x @ residual_rotation(width, 5), atol=1e-12)


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "gemma", "phi3"])
def test_online_rotations_leave_the_float_model_unchanged(model_type):
    """o_proj / down_proj (every expert's) compute on inputs rotated at run time, their weights stored as W Q."""
    from lowbit.runtime.rotated_input import RotatedInput

    model = toy_model(model_type)
    test = calibration(2, 40, seed=1)
    expected = logits(model, test)
    rotated = lowbit.quantize(model, Recipe(steps=(Rotate(seed=1, online=True),)), calibration(4, 32), batch_size=2)
    assert relative(logits(rotated, test), expected) < 2e-6
    wrapped = [n for n, m in rotated.named_modules() if isinstance(m, RotatedInput)]
    assert any(n.endswith("o_proj") for n in wrapped) and any(n.endswith("down_proj") for n in wrapped)


def test_online_rotations_save_load_and_run_on_every_backend_with_the_same_logits(tmp_path):
    from lowbit.export.compressed_tensors import write_compressed_tensors
    from lowbit.export.gptq_checkpoint import write_gptq
    from toy import byte_tokenizer

    ids, test = calibration(8, 32), calibration(2, 40, seed=1)
    recipe = resolve_recipe("quarot-gptq-w4a4")
    model = lowbit.quantize(toy_model("llama"), recipe, ids, batch_size=4)
    lowbit.save(model, tmp_path / "mem", tokenizer=byte_tokenizer())
    quantize_checkpoint(save_toy("llama", tmp_path / "src"), recipe, ids, tmp_path / "disk", batch_size=4, progress=False)
    expected = logits(model, test)
    for folder in ("mem", "disk"):
        for backend in ("exact", "dequantized"):
            assert torch.equal(logits(lowbit.load(tmp_path / folder, backend=backend), test), expected)
    loaded = lowbit.load(tmp_path / "disk")
    for write in (write_compressed_tensors, write_gptq):
        with pytest.raises(LowbitError, match="rotates its input at run time"):
            write(tmp_path / "disk", loaded, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(LowbitError, match="online rotation"):
        recipe.check_export("gguf")


def test_online_rotations_spread_down_proj_outliers_for_4_bit_inputs():
    """A down_proj input channel 50x the others (as in SmolLM2's block 11): 4-bit per-token inputs lose it
    unrotated; rotated online, down_proj's error falls."""
    model = toy_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[[5, 77]] *= 50.0
            layer.mlp.down_proj.weight[:, [5, 77]] /= 50.0
    ids, test = calibration(8, 32), calibration(2, 40, seed=1)
    expected = logits(model, test)
    steps = (RTN(W8), ActQuant(bits=4, granularity="token"))
    errors = {}
    for name, rotation in (("offline", Rotate()), ("online", Rotate(online=True))):
        quantized = lowbit.quantize(toy_model_copy(model), Recipe(steps=(rotation, *steps)), ids, batch_size=4)
        errors[name] = relative(logits(quantized, test), expected)
    assert errors["online"] < 0.7 * errors["offline"], errors


def toy_model_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def test_stored_bits_of_online_rotated_linears_are_their_inner_modules(tmp_path):
    import json

    from lowbit.numerics.bit_budget import linear_bits_per_weight
    from toy import byte_tokenizer

    ids = calibration(4, 32)
    folders = {}
    for name in ("gptq-w4g128-sym", "quarot-gptq-w4g128-sym"):
        model = lowbit.quantize(toy_model("llama"), resolve_recipe(name), ids, batch_size=2)
        lowbit.save(model, tmp_path / name, tokenizer=byte_tokenizer())
        names = [r.name for b in model.lowbit_info.report.blocks for r in b.linears]
        modules = json.loads((tmp_path / name / "lowbit_config.json").read_text())["modules"]
        folders[name] = linear_bits_per_weight(modules, names)
    assert folders["quarot-gptq-w4g128-sym"] is not None
    assert folders["quarot-gptq-w4g128-sym"] == folders["gptq-w4g128-sym"]


def test_online_rotations_refuse_steps_that_read_inputs_in_the_other_basis():
    for name, message in (("quarot-smoothquant-w8a8", "not combined with"), ("quarot-wanda-50", "RTN or GPTQ"),
                          ("quarot-autoround-w4g128", "RTN or GPTQ"), ("quarot-w8a8-naive", "RTN or GPTQ"),
                          ("quarot-gptq-q4_k", "integer grids"), ("quarot-nvfp4", "RTN or GPTQ")):
        with pytest.raises(LowbitError, match=message):
            resolve_recipe(name)


def test_the_sweep_rotates_every_method_and_draws_each_rotation_as_its_own_curve(tmp_path):
    import argparse

    from lowbit.cli.compare_cmd import planned_recipes
    from lowbit.evaluation.compare_plots import quant_curves
    from lowbit.preset_names import ROTATED_SWEEP_METHODS
    from lowbit.presets import sweep_recipe

    for method in ROTATED_SWEEP_METHODS:  # every listed method builds (its steps' checks pass)
        recipe = sweep_recipe(method, 4, 128)
        assert recipe.name.startswith(method.split("-")[0] + "-") and resolve_recipe(recipe.name) == recipe
    args = argparse.Namespace(recipes=[], methods=["gptq", "rotate-gptq", "quarot-gptq"], bits=[3, 4],
                              group_sizes=[128], fits=["range"])
    planned = planned_recipes(args, tmp_path)
    assert planned["quarot-gptq-w3g128"][1].steps[0] == Rotate(online=True)
    rows = [{"recipe": "fp", "config": None, "perplexity": 10.0}]
    rows += [{"recipe": name, "config": recipe.to_dict(), "perplexity": 20.0} for name, (_, recipe) in planned.items()]
    curves = quant_curves(rows)
    assert sorted(curves) == ["gptq g128", "quarot+gptq g128", "rotate+gptq g128"]
    assert all(sorted(b for b, _ in points) == [3, 4] for points in curves.values())
    with pytest.raises(LowbitError, match="unknown sweep method 'quarot-awq'"):
        sweep_recipe("quarot-awq", 4, 128)  # online rotations are not combined with AWQ's scales


def test_chunked_butterflies_give_the_stage_by_stage_bits(monkeypatch):
    """walsh_hadamard runs its butterflies on two buffers, a cache-sized chunk of rows at a time (for speed): every
    value is the same sums in the same order as one new tensor per stage over all rows, so the bits are equal, also
    when the chunks do not divide the rows; and a width with no odd factor skips the [[1]] matmul, bit for bit."""
    import lowbit.numerics.rotation as rotation

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)

    y = torch.randn(3, 11, 128, 3) * 7  # [..., p, m], float32: rounding differs with the order of the sums
    y[0, 0] = -0.0
    for chunk_bytes in (1 << 22, 5 * 128 * 3 * 4, 1):  # all rows, 5 rows (33 = 6 x 5 + 3), one row
        monkeypatch.setattr(rotation, "_CHUNK_BYTES", chunk_bytes)
        assert torch.equal(bits(rotation.walsh_hadamard(y)), bits(rotation._stage_by_stage(y)))
    for other in (y.double(), y[..., :1, :], y.transpose(0, 1)):  # float64 (weights), p == 1, not contiguous
        assert torch.equal(bits(rotation.walsh_hadamard(other)), bits(rotation._stage_by_stage(other)))
    signs, mix = rotation.rotation_factors(128, 3)  # m == 1
    x = torch.randn(4, 128)
    x[1] = -0.0  # the rotated row is -0.0 throughout: the matmul by [[1]] made it +0.0
    expected = (rotation._stage_by_stage((x * signs.float()).reshape(4, 128, 1)) @ mix.float()).reshape(4, 128)
    assert torch.equal(bits(rotation.rotate_last_dim(x, signs, mix)), bits(expected))
    leaf = x.clone().requires_grad_()  # under autograd (attribution through a QuaRot model): differentiable
    rotation.rotate_last_dim(leaf, signs, mix).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape
