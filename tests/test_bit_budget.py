"""Mixed precision to a budget: stored sizes, the allocator, the Fisher sensitivities, the plan in recipes, runs and
exports (numerics/bit_budget.py, pipeline/sensitivity.py)."""

import dataclasses
import json
import itertools
import random

import pytest
import torch

import lowbit
from lowbit.api import read_lowbit_config
from lowbit import GPTQ, RTN, WeightQuant
from lowbit.errors import LowbitError
from lowbit.numerics.bit_budget import Choice, allocate, candidate_grids, pareto, plan_bits, stored_bits
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.context import named_targets
from lowbit.pipeline.sensitivity import fisher_diagonal, linear_choices, plan_budget
from lowbit.presets import resolve_recipe
from lowbit.recipe import Recipe
from lowbit.runtime.weight_only import WeightOnlyLinear
from toy import byte_tokenizer, calibration, toy_model


@pytest.mark.parametrize("grid", [WeightQuant(bits=3, group_size=64), WeightQuant(bits=4, symmetric=True, group_size=32),
                                  WeightQuant(bits=5, group_size=128), WeightQuant(bits=2, granularity="channel"),
                                  WeightQuant(bits=8, symmetric=True, granularity="tensor")])
def test_stored_bits_are_the_packed_modules_bytes(grid):
    W = torch.randn(24, 200)  # 200 columns: a last partial group, and codes that do not fill whole bytes
    module = WeightOnlyLinear.from_qweight(rtn(W, grid), None)
    stored = sum(b.numel() * b.element_size() for b in module.buffers())
    assert stored_bits(grid, 24, 200) == 8 * stored


def test_choices_with_more_bits_and_no_less_error_are_dropped():
    grid = WeightQuant()
    choices = [Choice(grid, 10, 9.0), Choice(grid, 20, 4.0), Choice(grid, 30, 4.0), Choice(grid, 40, 0.5),
               Choice(grid, 50, 0.6), Choice(grid, 20, 5.0)]
    assert [(c.bits, c.error) for c in pareto(choices)] == [(10, 9.0), (20, 4.0), (40, 0.5)]


def brute_force(options: dict[str, list[Choice]], budget: float) -> float:
    names = list(options)
    best = float("inf")
    for pick in itertools.product(*(options[n] for n in names)):
        if sum(c.bits for c in pick) <= budget:
            best = min(best, sum(c.error for c in pick))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_optimum_within_the_budget(seed):
    rng = random.Random(seed)
    grid = WeightQuant()
    options = {}
    for i in range(5):  # five Linears, each with errors falling by a random factor per bit
        weight, decay = rng.uniform(0.1, 10.0), rng.uniform(1.5, 4.0)
        options[f"l{i}"] = [Choice(grid, b * 100, weight * decay ** -b) for b in (2, 3, 4, 5, 6, 8)]
    for budget in (1500, 2000, 2500, 3000):
        chosen = allocate(options, budget)
        assert sum(c.bits for c in chosen.values()) <= budget
        uniform = sum(min((c for c in cs if c.bits <= budget / 5), key=lambda c: c.error).error
                      for cs in options.values())
        total = sum(c.error for c in chosen.values())
        assert total <= uniform  # never worse than the best uniform plan that fits
        assert total == pytest.approx(brute_force(options, budget), rel=1e-12)
    # irregular sizes and a budget in many units (each choice's bits rounded up to a unit): it still fits
    sizes = {n: [Choice(grid, c.bits * 997 + 13 * i, c.error) for i, c in enumerate(cs)] for n, cs in options.items()}
    chosen = allocate(sizes, 2_345_678)
    assert sum(c.bits for c in chosen.values()) <= 2_345_678
    assert sum(c.error for c in chosen.values()) <= 1.001 * brute_force(sizes, 2_345_678)


def test_thousands_of_linears_are_planned_within_a_percent_of_the_optimum():
    """Beyond the exact table's size (mixtures of experts): the relaxation's plan is within 1% of a lower bound on
    the optimum (the Lagrangian dual: for any price lam, sum_l min_k (e_lk + lam b_lk) - lam B <= optimum)."""
    rng = random.Random(7)
    grid = WeightQuant()
    options = {}
    for i in range(3000):
        weight, decay, size = rng.uniform(0.1, 10.0), rng.uniform(1.5, 4.0), rng.choice((3, 8, 21)) * 1000
        options[f"l{i}"] = [Choice(grid, int(size * (b + 0.2)), weight * decay ** -b) for b in (2, 3, 4, 5, 6, 8)]
    budget = 1.5 * sum(cs[0].bits for cs in options.values())  # between every Linear on 2 bits and on 8
    chosen = allocate(options, budget)
    assert sum(c.bits for c in chosen.values()) <= budget
    total = sum(c.error for c in chosen.values())
    prices = [m * 10.0 ** e for e in range(-9, 0) for m in (1, 2, 5)]
    bound = max(sum(min(c.error + lam * c.bits for c in cs) for cs in options.values()) - lam * budget
                for lam in prices)
    assert bound <= total <= 1.01 * bound


def test_a_budget_below_the_smallest_plan_is_refused():
    grid = WeightQuant()
    with pytest.raises(LowbitError, match="below the smallest plan"):
        allocate({"a": [Choice(grid, 100, 1.0)], "b": [Choice(grid, 100, 1.0)]}, 150)


def test_the_fisher_is_each_sequences_squared_gradient_averaged():
    model = toy_model("llama")
    model.lm_head.weight.requires_grad_(False)  # one flag that differs, to see every flag left as it was
    model.train()  # dropout is off in the pass (and the mode restored): toy models have none, so only the mode shows
    flags = [p.requires_grad for p in model.parameters()]
    ids = calibration(n=3, length=16)
    linears = named_targets(model.model.layers, "model.layers", Recipe(steps=(RTN(),)).ignore)
    name = "model.layers.1.mlp.down_proj"
    fisher = fisher_diagonal(model, linears, ids)[name]
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    expected = torch.zeros_like(fisher)
    weight = linears[name].weight
    for seq in ids:
        weight.grad = None
        logits = model(input_ids=seq[None]).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, seq[1:]).backward()
        expected += weight.grad.square() / len(ids)
    torch.testing.assert_close(fisher, expected, rtol=1e-4, atol=1e-12)


def test_a_linear_whose_rounding_costs_more_gets_more_bits():
    W = torch.randn(32, 64)
    grids = [WeightQuant(bits=b, group_size=32) for b in (2, 4, 8)]
    options = {"quiet": linear_choices(W, torch.ones_like(W), grids),
               "loud": linear_choices(W, 1000 * torch.ones_like(W), grids)}
    # room for one Linear at 8 bits and one at 2 (both at 4 bits would fit too): the loud one gets the 8
    chosen = allocate(options, stored_bits(grids[2], 32, 64) + stored_bits(grids[0], 32, 64))
    assert (chosen["loud"].grid.bits, chosen["quiet"].grid.bits) == (8, 2)


def test_a_budget_spends_the_bits_where_the_trained_model_needs_them(trained_folder):
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(trained_folder, dtype=torch.float32)

    text = (trained_folder.parent / "corpus.txt").read_text()
    tokens = torch.tensor(byte_tokenizer()(text)["input_ids"])
    ids, held_out = tokens[: 8 * 64].reshape(8, 64), tokens[-8 * 64 :].reshape(8, 64)  # [8, 64] each
    uniform = Recipe(steps=(RTN(WeightQuant(bits=2, group_size=64)),))
    linears = named_targets(fresh().model.layers, "model.layers", uniform.ignore)
    size = plan_bits(dict.fromkeys(linears, uniform.steps[0].weights), linears)
    planned = plan_budget(fresh(), "model.layers", dataclasses.replace(uniform, budget=size), ids)
    assert set(planned.plan) == set(linears)
    assert size - 0.1 < plan_bits(planned.plan, linears) <= size  # the budget met, and spent
    assert len({g.label for g in planned.plan.values()}) > 1  # a mix, not the uniform grid again

    def loss(recipe):  # held-out loss of the quantized model
        model = lowbit.quantize(fresh(), recipe, ids, batch_size=4)
        with torch.no_grad():
            return float(model(input_ids=held_out, labels=held_out).loss)

    with torch.no_grad():
        float_loss = float(fresh()(input_ids=held_out, labels=held_out).loss)
    # the same bits placed by the Fisher: a smaller loss increase than the uniform grid's
    assert loss(planned) - float_loss < 0.9 * (loss(uniform) - float_loss)  # measured: 0.83x


def test_a_planned_output_stores_its_plan_and_loads_with_the_same_logits(tmp_path):
    ids = calibration(n=4, length=32)
    recipe = resolve_recipe("gptq-w4g32-b3.5")
    assert recipe.budget == 3.5 and recipe.needs_calibration and recipe.name == "gptq-w4g32-b3.5"
    model = lowbit.quantize(toy_model("llama"), recipe, ids, batch_size=2)
    planned = model.lowbit_info.recipe
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    stored = read_lowbit_config(tmp_path / "q")["recipe"]
    assert Recipe.from_dict(stored).plan == planned.plan and stored["budget"] == 3.5
    loaded = lowbit.load(tmp_path / "q")
    for name, grid in planned.plan.items():  # each Linear on its planned grid
        module = loaded.get_submodule(name)
        assert (module.bits, module.group_size) == (grid.bits, grid.group_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    rows = {row.name: row.method for block in model.lowbit_info.report.blocks for row in block.linears}
    assert rows["model.layers.0.mlp.down_proj"].startswith(f"gptq {planned.plan['model.layers.0.mlp.down_proj'].label}")
    assert model.lowbit_info.report.outside_seconds["budget plan"] > 0
    # the stored recipe runs its plan again without planning
    again = lowbit.quantize(toy_model("llama"), Recipe.from_dict(stored), ids, batch_size=2)
    assert again.lowbit_info.recipe.plan == planned.plan and "budget plan" not in again.lowbit_info.report.outside_seconds
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    # a stored plan that no longer meets its budget (edited) is refused, not run
    with pytest.raises(LowbitError, match="stores .* bits per weight, over its budget of 3"):
        lowbit.quantize(toy_model("llama"), Recipe.from_dict({**stored, "budget": 3.0}), ids, batch_size=2)
    partial = {**stored, "plan": dict(list(stored["plan"].items())[1:])}
    with pytest.raises(LowbitError, match="its plan leaves 1 Linears out"):
        lowbit.quantize(toy_model("llama"), Recipe.from_dict(partial), ids, batch_size=2)


def test_budget_names_round_trip():
    assert resolve_recipe("w4g128-b3.5-e6").budget == 3.5
    recipe = resolve_recipe("w4g128-e6").with_budget(3.25)
    assert recipe.name == "w4g128-b3.25-e6" and recipe.budget == 3.25
    assert resolve_recipe(recipe.name) == recipe
    assert resolve_recipe("gptq-w4g128-b3.5").with_budget(4).name == "gptq-w4g128-b4"


@pytest.mark.parametrize("build, message", [
    (lambda: resolve_recipe("q4_k").with_budget(3.5), "chooses integer grids"),
    (lambda: resolve_recipe("nvfp4a16").with_budget(3.5), "chooses integer grids"),
    (lambda: resolve_recipe("w8a8-token").with_budget(6), "weight-only"),
    (lambda: resolve_recipe("wanda-50").with_budget(3.5), "chooses integer grids"),
    (lambda: resolve_recipe("w4g128").with_budget(0.5), r"bits per weight in \(1, 16\]"),
    (lambda: Recipe(steps=(RTN(),), plan={"x": WeightQuant.k_grid("Q4_K")}), "a plan holds integer grids"),
    (lambda: Recipe(steps=(GPTQ(act_order=True, static_groups=False),), budget=3.5), "int32 per column"),
])
def test_budgets_are_refused_where_they_mean_nothing(build, message):
    with pytest.raises(LowbitError, match=message):
        build()


@pytest.mark.parametrize("ids, message", [
    (torch.full((2, 16), 10_000), "token id"), (torch.zeros(16, dtype=torch.long), "shaped \\[n_sequences, seq_len\\]"),
])
def test_bad_calibration_is_one_line_before_the_sensitivity_pass(ids, message):
    with pytest.raises(LowbitError, match=message):
        lowbit.quantize(toy_model("llama"), resolve_recipe("w4g128-b3.5"), ids)
    with pytest.raises(LowbitError, match="ignore pattern"):
        lowbit.quantize(toy_model("llama"), dataclasses.replace(resolve_recipe("w4g128-b3.5"), ignore=("*",)),
                        calibration(n=2, length=16))


def test_a_plan_for_another_model_is_refused_before_any_work():
    recipe = Recipe(steps=(RTN(),), plan={"model.layers.7.mlp.up_proj": WeightQuant(bits=3)})
    with pytest.raises(LowbitError, match="plan names 1 Linear .*model.layers.7.mlp.up_proj"):
        lowbit.quantize(toy_model("llama"), recipe, None)
    with pytest.raises(LowbitError, match="pass token ids"):
        lowbit.quantize(toy_model("llama"), resolve_recipe("w4g128-b3.5"), None)


@pytest.mark.parametrize("fmt", ["gguf", "gptq"])
def test_formats_with_one_grid_refuse_a_plan(fmt):
    with pytest.raises(LowbitError, match="plans a grid per Linear"):
        resolve_recipe("w4g32-sym-b3.5").check_export(fmt)


def test_compressed_tensors_checks_a_hand_written_plans_grids_before_any_work():
    from lowbit.export.compressed_tensors import check_recipe_for_compressed_tensors

    symmetric = WeightQuant(bits=4, symmetric=True, group_size=32)
    for planned, message in ((WeightQuant(bits=8), "asymmetric"),
                             (WeightQuant(bits=8, symmetric=True, granularity="tensor"), "per-tensor")):
        recipe = Recipe(steps=(GPTQ(symmetric),), plan={"model.layers.0.mlp.up_proj": planned})
        with pytest.raises(LowbitError, match=message):
            check_recipe_for_compressed_tensors(recipe)


def test_a_symmetric_plan_exports_to_compressed_tensors_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import write_compressed_tensors

    plan = {"model.layers.0.mlp.down_proj": WeightQuant(bits=8, symmetric=True, group_size=32),
            "model.layers.1.self_attn.q_proj": WeightQuant(bits=8, symmetric=True, group_size=64)}
    recipe = Recipe(steps=(GPTQ(WeightQuant(bits=4, symmetric=True, group_size=32)),), plan=plan)
    model = lowbit.quantize(toy_model("llama"), recipe, calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    model = lowbit.load(tmp_path / "q")
    config = write_compressed_tensors(tmp_path / "q", model, tmp_path / "ct")
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"]): g["targets"]
              for g in config["config_groups"].values()}
    # one scheme per grid (a 64-column group of a 64-wide Linear is a per-channel scale there)
    assert groups[(8, 32)] == ["model.layers.0.mlp.down_proj"] and groups[(8, None)] == ["model.layers.1.self_attn.q_proj"]
    assert len(groups[(4, 32)]) == 12 and config["format"] == "pack-quantized"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)


def test_the_candidates_keep_the_grids_symmetry_and_fit():
    grids = candidate_grids(WeightQuant(bits=4, symmetric=True, group_size=128, fit="mse"))
    assert {(g.symmetric, g.fit) for g in grids} == {(True, "mse")}
    assert {g.bits for g in grids} == {2, 3, 4, 5, 6, 8} and {g.group_size for g in grids} == {32, 64, 128}
    assert {g.granularity for g in candidate_grids(WeightQuant(granularity="channel"))} == {"channel"}


def test_compare_names_budget_rows_and_draws_them_at_their_bits_per_weight(tmp_path):
    import argparse

    from lowbit.cli.compare_cmd import planned_recipes
    from lowbit.evaluation.comparison import comparison_cells
    from lowbit.evaluation.compare_plots import quant_curves
    from lowbit.evaluation.recommend import recommendations

    args = argparse.Namespace(recipes=["w4g128-b3.5", "w4g128", "w3g128"], methods=[], bits=[], group_sizes=[], fits=[])
    planned = planned_recipes(args, tmp_path)
    assert list(planned) == ["w4g128-b3.5", "w4g128", "w3g128"]  # the name keeps its dot
    rows = [{"recipe": "fp", "config": None, "perplexity": 10.0}]
    rows += [{"recipe": name, "config": recipe.to_dict(), "perplexity": 20.0} for name, (_, recipe) in planned.items()]
    assert quant_curves(rows) == {"rtn mixed": [(3.5, 20.0)], "rtn g128": [(4, 20.0), (3, 20.0)]}
    rows[1]["perplexity"] = 19.0  # the recommendation names it by its bits per weight, not under W4 g128
    rows[0].update(disk_bytes=100, eval_tokens_per_second=1.0, description="fp")
    for r in rows[1:]:
        r.update(disk_bytes=50, eval_tokens_per_second=1.0, description=r["recipe"])
    lines = recommendations({"model": "m", "settings": {}, "rows": rows}, None)
    assert any(line.startswith("For W3.5 mixed, use w4g128-b3.5") for line in lines)
    assert any(line.startswith("For W4 g128, use w4g128:") for line in lines)
    base = {"perplexity": 10.0, "disk_bytes": 100, "eval_tokens_per_second": 1.0}
    row = {**base, "linear_bits_per_weight": 3.49871}
    assert comparison_cells(row, base)["Linear bits/weight"] == "3.499"
    assert comparison_cells(base, base)["Linear bits/weight"] == ""


def test_quantize_budget_on_the_command_line(toy_folder, tmp_path, capsys):
    from lowbit.cli.main import main
    from toy import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    small = ["--calib", str(corpus), "--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]

    def run(*argv):
        code = main(["--quiet", *map(str, argv)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    out = tmp_path / "q"
    code, stdout, _ = run("quantize", "--model", toy_folder(), "--recipe", "gptq-w4g32-sym", "--budget", "3.5",
                          "--out", out, "--json", *small)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["recipe"]["name"] == "gptq-w4g32-sym-b3.5" and len(summary["recipe"]["plan"]) == 14
    assert 3.4 < summary["linear_bits_per_weight"] <= 3.5 and summary["phase_seconds"]["budget plan"] > 0
    # refused in one line before any work: a budget out of range, a format with one grid per model
    for argv, message in ((["--budget", "0.5"], "--budget 0.5 is out of range"),
                          (["--budget", "3.5", "--format", "gptq"], "plans a grid per Linear")):
        code, _, err = run("quantize", "--model", toy_folder(), "--recipe", "gptq-w4g32-sym", "--out",
                           tmp_path / "refused", *argv, *small)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()
