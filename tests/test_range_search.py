"""Range search ("mse" / "imatrix-mse" fits): each group's searched grid rounds it no worse than its min-max grid,
much better on heavy-tailed weights, weighted by the inputs where asked; the result is an ordinary grid."""

import pytest
import torch

import lowbit
from lowbit import AWQ, GPTQ, RTN, WeightQuant
from lowbit.errors import LowbitError
from lowbit.numerics.grid import fake_quantize, grouped
from lowbit.numerics.range_search import SEARCHES
from lowbit.numerics.rtn import fit_grid, group_size_for, rtn
from lowbit.presets import resolve_recipe
from lowbit.recipe import Recipe
from toy import calibration, outlier_inputs, toy_model


def heavy_tailed(out: int = 96, n: int = 320, seed: int = 3) -> torch.Tensor:
    """Student-t weights (3 degrees of freedom): a few large values per group, as trained LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(out, n, generator=g)
    chi2 = torch.randn(3, out, n, generator=g).pow(2).sum(0) / 3
    return normal / chi2.sqrt() / n**0.5


def group_errors(W: torch.Tensor, spec: WeightQuant, scale, zero, norm: float, importance=None) -> torch.Tensor:
    """sum_k c_k |q(w_k) - w_k|^norm per group [rows, n_groups] (per tensor: [1, 1])."""
    if spec.granularity == "tensor":
        err = (fake_quantize(W, scale, zero, spec.bits) - W).abs().pow(norm)
        return (err * (importance if importance is not None else 1)).sum().reshape(1, 1)
    gs = group_size_for(spec, W.shape[1])
    idx = torch.arange(W.shape[1]) // gs
    err = (fake_quantize(W, scale[:, idx], zero[:, idx], spec.bits) - W).abs().pow(norm)
    if importance is not None:
        err = err * importance
    return grouped(err, gs).sum(-1)


@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fit", ["mse", "imatrix-mse"])
def test_the_searched_grid_rounds_each_group_no_worse_and_the_whole_much_better(granularity, symmetric, fit):
    W = heavy_tailed()  # 320 columns: g128 leaves a partial last group
    importance = outlier_inputs(tokens=64, features=320, scale=8.0).pow(2).mean(0)
    plain = WeightQuant(bits=3, symmetric=symmetric, granularity=granularity, group_size=128)
    searched = WeightQuant(bits=3, symmetric=symmetric, granularity=granularity, group_size=128, fit=fit)
    search = SEARCHES[fit]
    weight = importance if search.weighted else None
    base = group_errors(W, plain, *fit_grid(W, plain), search.norm, weight)
    scale, zero = fit_grid(W, searched, importance)
    ours = group_errors(W, searched, scale, zero, search.norm, weight)
    assert ours.shape == base.shape
    assert bool((ours <= base * (1 + 1e-6)).all())  # the full range is a candidate
    assert ours.sum() < 0.9 * base.sum()
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.half().float())  # stored as float16, as searched
    assert torch.equal(zero, zero.round())


def test_imatrix_mse_weighs_the_columns_by_their_inputs():
    W = heavy_tailed()
    spec = WeightQuant(bits=3, group_size=64, fit="imatrix-mse")
    # only the columns' relative importance counts
    ones = fit_grid(W, spec, torch.ones(W.shape[1]))
    assert all(torch.equal(a, b) for a, b in zip(ones, fit_grid(W, spec, torch.full((W.shape[1],), 4.0))))
    # columns whose inputs are large move the search: the weighted error it minimises is lower than the uniform pick's
    importance = outlier_inputs(tokens=64, features=320, scale=20.0).pow(2).mean(0)
    weighted = fit_grid(W, spec, importance)
    assert not torch.equal(weighted[0], ones[0])
    norm = SEARCHES["imatrix-mse"].norm
    assert group_errors(W, spec, *weighted, norm, importance).sum() < group_errors(W, spec, *ones, norm, importance).sum()


def test_range_search_lowers_the_output_error_at_3_bits_and_quantizes_exactly():
    W = heavy_tailed(128, 256)
    X = outlier_inputs(tokens=256, features=256, scale=1.0)
    errors = {}
    for fit in ("range", "mse", "imatrix-mse"):
        spec = WeightQuant(bits=3, group_size=128, fit=fit)
        q = rtn(W, spec, X.pow(2).sum(0))
        scale, zero = fit_grid(W, spec, X.pow(2).sum(0))
        assert torch.equal(q.scale.float(), scale)  # an ordinary grid: codes, float16 scale, zero
        idx = torch.arange(256) // 128
        assert torch.equal(q.dequantize().float(), fake_quantize(W, scale[:, idx], zero[:, idx], 3))
        errors[fit] = (X @ (q.dequantize().float() - W).T).pow(2).mean().item()
    assert errors["mse"] < 0.9 * errors["range"] and errors["imatrix-mse"] < 0.9 * errors["range"]


def test_gptq_and_rtn_quantize_a_model_with_searched_grids():
    ids = calibration(n=4, length=32)
    for name in ("gptq-w3g32-mse", "w3g32-imse", "awq-w3g32-imse"):
        recipe = resolve_recipe(name)
        assert recipe.needs_calibration
        model = lowbit.quantize(toy_model("llama"), recipe, ids, batch_size=2)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
    assert resolve_recipe("gptq-w3g128-mse").steps[0].weights.fit == "mse"
    assert resolve_recipe("w3g128-imse").steps[0].label == "rtn W3 asym g128 imatrix-mse"
    assert not resolve_recipe("w3g128-mse").needs_calibration  # the unweighted search reads the weights alone
    assert not resolve_recipe("awq-w3g128-mse").steps[0].searches_clip  # the range search is its clip
    assert resolve_recipe("awq-w3g128").steps[0].searches_clip


@pytest.mark.parametrize("fit", ["mse", "imatrix-mse"])
def test_awq_judges_its_scales_by_the_searched_grid(fit):
    from lowbit.methods.awq import search_awq_scale
    from lowbit.numerics.scales import awq_ratios, awq_scales

    W = heavy_tailed(128, 256)
    X = outlier_inputs(tokens=256, features=256, scale=20.0)
    linear = torch.nn.Linear(256, 128, bias=False)
    linear.weight.data = W.clone()
    searched, plain = WeightQuant(bits=3, group_size=128, fit=fit), WeightQuant(bits=3, group_size=128)
    sumsq = X.pow(2).sum(0)

    def served_error(s: torch.Tensor) -> float:  # W s on the searched grid, its columns weighted by (x / s)^2
        q = rtn(W * s, searched, sumsq / s.pow(2)).dequantize().float()
        return ((X / s) @ q.T - X @ W.T).pow(2).sum().item()

    ours = search_awq_scale([linear], X.abs().mean(0), searched, 20, lambda: [linear(X)], x_sumsq=sumsq)
    min_max = search_awq_scale([linear], X.abs().mean(0), plain, 20, lambda: [linear(X)])
    assert torch.equal(linear.weight, W)
    # the pick is the candidate whose served rounding (the searched grid, weighted by x / s) errs least ...
    candidates = [awq_scales(X.abs().mean(0), r) for r in awq_ratios(20)]
    assert served_error(ours) == pytest.approx(min(served_error(s) for s in candidates), rel=1e-6)
    # ... which the min-max search's pick is not, nor no scaling (s = 1, a candidate)
    assert served_error(ours) < 0.99 * served_error(min_max)
    assert served_error(ours) < 0.85 * served_error(torch.ones(256))


def test_saved_awq_clips_are_reapplied_only_to_the_grid_they_were_searched_for(tmp_path):
    from toy import byte_tokenizer

    ids = calibration(n=4, length=32)
    for made, reused, message in (("awq-w3g32", "awq-w3g32-mse", "searched for min-max rounding"),
                                  ("awq-w3g32-mse", "awq-w3g32", "has no tensor")):
        model = lowbit.quantize(toy_model("llama"), resolve_recipe(made), ids, batch_size=2)
        lowbit.save(model, tmp_path / made, tokenizer=byte_tokenizer())
        again = resolve_recipe(reused).reusing_transforms(str(tmp_path / made))
        with pytest.raises(LowbitError, match=message):
            lowbit.quantize(toy_model("llama"), again, ids, batch_size=2)
    # a searched run re-applies its own scales: the same model
    same = resolve_recipe("awq-w3g32-mse").reusing_transforms(str(tmp_path / "awq-w3g32-mse"))
    test = calibration(n=2, length=40, seed=1)
    with torch.no_grad():
        first = lowbit.load(tmp_path / "awq-w3g32-mse")(test).logits
        assert torch.equal(lowbit.quantize(toy_model("llama"), same, ids, batch_size=2)(test).logits, first)


@pytest.mark.parametrize("build, message", [
    (lambda: WeightQuant(ggml="Q4_K", bits=4, symmetric=False, group_size=32, fit="mse"), "llama.cpp fits them"),
    (lambda: WeightQuant(bits=4, symmetric=True, group_size=16, float_type="NVFP4", fit="mse"), "from their range"),
    (lambda: RTN(WeightQuant(fit="mse"), importance=True), "unweighted search"),
    (lambda: RTN(WeightQuant(fit="imatrix-mse"), importance=True), "always weighs"),
    (lambda: Recipe(steps=(AWQ(WeightQuant(bits=4, group_size=32)),),
                    plan={"model.layers.0.self_attn.q_proj": WeightQuant(bits=4, group_size=32, fit="imatrix-mse")}),
     "fitted by 'imatrix-mse', the recipe's rounding by 'range'"),
    (lambda: resolve_recipe("autoround-w3g128-mse"), "autoround learns each group's range"),
    (lambda: Recipe(steps=(GPTQ(),), embeddings=WeightQuant(bits=8, fit="imatrix-mse")), "calibration inputs"),
    (lambda: Recipe(steps=(GPTQ(),), head=WeightQuant(bits=8, fit="imatrix-mse")), "calibration inputs"),
    (lambda: __import__("lowbit.presets").presets.sweep_recipe("gptq", 4, 128, fit="llama"), "a sweep's fit"),
])
def test_searched_fits_are_refused_where_they_mean_nothing(build, message):
    with pytest.raises(LowbitError, match=message):
        build()


def test_the_recommendation_measures_a_searched_grid_against_min_max_rounding():
    from lowbit.evaluation.recommend import recommendations

    def row(name: str, perplexity: float) -> dict:
        config = resolve_recipe(name).to_dict() if name != "fp" else None
        return {"recipe": name, "perplexity": perplexity, "disk_bytes": 100 if config else 400, "config": config,
                "description": name}

    # the searched RTN row comes first: still, round-to-nearest is the min-max row
    rows = [row("fp", 10.0), row("w3g128-mse", 14.0), row("w3g128", 20.0), row("gptq-w3g128", 25.0)]
    sentence = next(s for s in recommendations({"rows": rows}) if s.startswith("For W3 g128"))
    assert sentence.startswith("For W3 g128, use w3g128-mse: perplexity 14.000")
    assert "round-to-nearest (w3g128) gives +100.0%" in sentence and "gptq-w3g128 did not beat it" in sentence
    # of two rows of the same size within a budget, the smallest-within sentence names the better one
    rows = [row("fp", 10.0), row("awq-w4g128", 12.2), row("gptq-w4g128", 11.5)]
    smallest = next(s for s in recommendations({"rows": rows}) if s.startswith("Smallest within 25%"))
    assert "gptq-w4g128" in smallest and "awq" not in smallest


def test_gptq_fits_each_group_by_the_search_under_the_hessian_diagonal():
    from lowbit.numerics.hessian import prepare_hessian
    from lowbit.numerics.obs import gptq

    W = heavy_tailed(64, 200)  # a partial last group of 8 columns at g64
    X = outlier_inputs(tokens=256, features=200, scale=10.0)
    H = 2 * X.T @ X / X.shape[0]
    scales = {}
    for fit in ("range", "imatrix-mse"):
        spec = WeightQuant(bits=3, group_size=64, fit=fit)
        # groups fitted up front (act-order's static groups): exactly fit_grid under H's diagonal
        upfront = gptq(W.clone(), H.clone(), spec, act_order=True, static_groups=True).qweight
        Wp, Hp, _ = prepare_hessian(W.clone(), H.clone())
        assert torch.equal(upfront.scale.float(), fit_grid(Wp, spec, torch.diagonal(Hp))[0])
        lazy = gptq(W.clone(), H.clone(), spec).qweight  # each group searched on the error-updated weights
        assert lazy.scale.shape == (64, 4)
        scales[fit] = lazy.scale
        errors = (X @ (lazy.dequantize().float() - W).T).pow(2).mean().item()
        scales[fit + " error"] = errors
    assert not torch.equal(scales["range"], scales["imatrix-mse"])
    assert scales["imatrix-mse error"] < scales["range error"]


def test_compare_sweeps_the_fits_and_draws_each_fit_as_its_own_curve(tmp_path):
    import argparse

    from lowbit.cli.compare_cmd import planned_recipes
    from lowbit.evaluation.compare_plots import quant_curves

    args = argparse.Namespace(recipes=["w3g128"], methods=["rtn", "gptq"], bits=[3], group_sizes=[128],
                              fits=["range", "mse", "imatrix-mse"])
    planned = planned_recipes(args, tmp_path)
    assert list(planned) == ["w3g128", "w3g128-mse", "w3g128-imse", "gptq-w3g128", "gptq-w3g128-mse",
                             "gptq-w3g128-imse"]
    assert planned["w3g128"][0] == "w3g128" and planned["gptq-w3g128-imse"][1].steps[0].weights.fit == "imatrix-mse"
    rows = [{"recipe": "fp", "config": None, "perplexity": 10.0}]
    rows += [{"recipe": name, "config": recipe.to_dict(), "perplexity": 20.0} for name, (_, recipe) in planned.items()]
    assert sorted(quant_curves(rows)) == ["gptq g128", "gptq imatrix-mse g128", "gptq mse g128", "rtn g128",
                                          "rtn imatrix-mse g128", "rtn mse g128"]
