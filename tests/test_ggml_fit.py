"""llama.cpp's fit of its grids (numerics/ggml_fit.py): the weighted searches never do worse than the range they
start from, the signed symmetric step uses both ends of the codes, an importance (the Hessian's diagonal) lowers
the output error of rounding, the signed scales are stored and exported exactly, and the fit is checked."""

import gguf
import pytest
import torch

from lowbit import RTN, WeightQuant
from lowbit.errors import LowbitError
from lowbit.export.ggml_blocks import ggml_blocks
from lowbit.numerics.ggml_fit import IMPORTANCE_SEARCH, affine_search, signed_max, symmetric_search
from lowbit.numerics.obs import gptq
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.observers import HessianObserver
from lowbit.presets import resolve_recipe
from lowbit.recipe import AWQ
from metrics import output_error
from toy import outlier_inputs, random_weight


def blocks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights x and importances w [64 blocks, 32]: heavy-tailed weights, importances spanning 1000x."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=generator) ** 3
    w = torch.rand(64, 32, generator=generator) ** 6 + 1e-3
    return x, w


def weighted_error(x, w, step, minimum, lo: int, hi: int) -> torch.Tensor:
    """Per-block sum w (grid value - x)^2 with nearest codes in lo .. hi: [blocks]."""
    codes = torch.round((x - minimum.unsqueeze(-1)) / step.unsqueeze(-1)).clamp(lo, hi)
    return (w * (codes * step.unsqueeze(-1) + minimum.unsqueeze(-1) - x) ** 2).sum(dim=-1)


@pytest.mark.parametrize("bits", [4, 5])
def test_symmetric_search_never_loses_to_the_signed_max_step_and_usually_wins(bits):
    x, w = blocks()
    nmax = 1 << (bits - 1)
    searched = symmetric_search(x, w, bits)
    plain = signed_max(x) / -nmax
    zero = torch.zeros(64)
    found, start = weighted_error(x, w, searched, zero, -nmax, nmax - 1), weighted_error(x, w, plain, zero, -nmax, nmax - 1)
    assert bool((found <= start * (1 + 1e-5)).all())
    assert float(found.sum()) < 0.9 * float(start.sum())


def test_affine_search_never_loses_to_the_range_and_keeps_the_minimum_storable():
    x, w = blocks(seed=1)
    fit = affine_search(x, w, 15, IMPORTANCE_SEARCH)
    lo = x.amin(dim=-1).clamp(max=0.0)
    start = weighted_error(x, w, (x.amax(dim=-1) - lo) / 15, lo, 0, 15)
    found = weighted_error(x, w, fit.step, fit.minimum, 0, 15)
    assert bool((found <= start * (1 + 1e-5)).all()) and float(found.sum()) < 0.9 * float(start.sum())
    assert bool((fit.minimum <= 0).all()) and bool((fit.step > 0).all())


def test_signed_step_maps_the_largest_magnitude_weight_to_the_lowest_code_exactly():
    W = random_weight(8, 64)
    W[0, 3], W[1, 40] = 2.0, -2.0  # a positive and a negative largest weight
    grid = WeightQuant(bits=5, symmetric=True, group_size=32, fit="llama")
    qweight = rtn(W, grid)
    assert int(qweight.codes[0, 3]) == 0 and int(qweight.codes[1, 40]) == 0  # code -16: both signs reach it
    assert float(qweight.scale[0, 0]) < 0 < float(qweight.scale[1, 1])
    assert float(qweight.dequantize()[0, 3]) == 2.0 and float(qweight.dequantize()[1, 40]) == -2.0
    # a finer grid than absmax / 15: less error on the same weights
    plain = rtn(W, WeightQuant(bits=5, symmetric=True, group_size=32))
    assert (qweight.dequantize() - W).norm() < (plain.dequantize() - W).norm()


@pytest.mark.parametrize("grid", [WeightQuant.k_grid("Q4_K"), WeightQuant.k_grid("Q3_K"),
                                  WeightQuant(bits=5, symmetric=True, group_size=32, fit="llama")],
                         ids=["Q4_K", "Q3_K", "Q5_0"])
def test_the_hessian_diagonal_as_importance_lowers_the_output_error(grid):
    X = outlier_inputs(tokens=1024, features=512, scale=8.0)
    W = random_weight(64, 512, seed=2)
    observer = HessianObserver()
    observer.add_batch(X)
    importance = torch.diagonal(observer.H)
    data_free = output_error(W, rtn(W, grid).dequantize(), X)
    weighted = output_error(W, rtn(W, grid, importance).dequantize(), X)
    assert weighted < 0.95 * data_free
    # GPTQ fits its grids under the same importance, then compensates: lower still
    assert output_error(W, gptq(W, observer.H, grid).weight, X) < weighted


@pytest.mark.parametrize("bits, kind", [(4, "Q4_0"), (5, "Q5_0"), (8, "Q8_0")])
def test_signed_scales_are_exported_to_gguf_exactly(bits, kind):
    X = outlier_inputs(tokens=256, features=128)
    observer = HessianObserver()
    observer.add_batch(X)
    W = random_weight(16, 128)
    result = gptq(W, observer.H, WeightQuant(bits=bits, symmetric=True, group_size=32, fit="llama"))
    assert bool((result.qweight.scale < 0).any()) and bool((result.qweight.scale > 0).any())
    stored_kind, stored = ggml_blocks(result.qweight)
    restored = gguf.quants.dequantize(stored, getattr(gguf.GGMLQuantizationType, kind))
    assert stored_kind == kind and torch.equal(torch.from_numpy(restored.copy()), result.weight)


def test_the_fit_is_checked():
    with pytest.raises(LowbitError, match="fit must be one of"):
        WeightQuant(fit="minmax")
    with pytest.raises(LowbitError, match="searches per group"):
        WeightQuant(granularity="channel", fit="llama")


def test_the_importance_reaches_the_fits_that_search_and_only_those():
    imatrix = resolve_recipe("imatrix-q4_k_m").steps[0]
    assert isinstance(imatrix, RTN) and imatrix.importance and imatrix.needs().input_norm
    assert not resolve_recipe("q4_k_m").steps[0].needs().input_norm  # plain RTN stays data-free
    # AWQ calibrates anyway: its implied rounding fits a K grid under the inputs' importance, a range grid as before
    assert AWQ(WeightQuant.k_grid("Q4_K_M")).implied_rounding().importance
    assert not AWQ(WeightQuant(bits=4)).implied_rounding().importance
    assert WeightQuant.k_grid("Q5_K").fit == "llama" and WeightQuant(bits=4, ggml="Q4_K", group_size=32).fit == "llama"
    with pytest.raises(LowbitError, match="fitted from its range"):
        RTN(WeightQuant(bits=4), importance=True)


def test_awq_searches_on_the_grid_it_rounds_on_fit_and_k_type_included():
    from lowbit.recipe import GPTQ, Recipe

    g32 = WeightQuant(bits=5, symmetric=True, group_size=32)
    with pytest.raises(LowbitError, match="one grid per recipe"):
        Recipe((AWQ(g32), GPTQ(WeightQuant(bits=5, symmetric=True, group_size=32, fit="llama"))))
    with pytest.raises(LowbitError, match="grids must agree"):  # the K-grid check of the recipe says it first
        Recipe((AWQ(WeightQuant.k_grid("Q4_K")), GPTQ(WeightQuant.k_grid("Q4_K_M"))))
    Recipe((AWQ(WeightQuant.k_grid("Q4_K_M")), GPTQ(WeightQuant.k_grid("Q4_K_M"))))  # the awq-gptq-q4_k_m recipe
