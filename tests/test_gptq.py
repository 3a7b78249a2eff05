"""GPTQ and SparseGPT (one OBS sweep): relative quality against RTN/Wanda on the same data, exact storage."""

import pytest
import torch

from lowbit.numerics.hessian import inverse_hessian
from lowbit.numerics.obs import gptq, sparsegpt
from lowbit.numerics.prune import nm_violations, prune_mask, wanda_scores
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.observers import HessianObserver
from lowbit.recipe import WeightQuant
from metrics import output_error
from toy import outlier_inputs, random_weight


def hessian(X):
    obs = HessianObserver()
    for chunk in X.split(100):
        obs.add_batch(chunk)
    return obs.H


@pytest.fixture(scope="module")
def data():
    """X [1024, 256]: outlier inputs plus 16 factors shared by all channels (std ~4 per channel), W [128, 256], H.
    Real LLM activations are correlated; on independent channels H is nearly diagonal, and GPTQ/SparseGPT, whose
    gain is feeding each column's error into the columns correlated with it, differ from RTN/Wanda only through
    the sampled off-diagonals (measured without the factors: GPTQ/RTN 0.973-0.977, SparseGPT/Wanda 0.951)."""
    generator = torch.Generator().manual_seed(2)
    shared = torch.randn(1024, 16, generator=generator) @ torch.randn(16, 256, generator=generator)
    X = outlier_inputs(tokens=1024, features=256) + shared
    return X, random_weight(128, 256), hessian(X)


def test_hessian_observer_is_2_xtx_over_n(data):
    X, _, H = data
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("spec", [WeightQuant(4, False, "group", 64), WeightQuant(3, False, "group", 128),
                                  WeightQuant(4, True, "channel"), WeightQuant(8, True, "tensor")])
def test_gptq_beats_rtn_on_outlier_inputs(data, spec):
    X, W, H = data
    result = gptq(W, H, spec)
    # measured GPTQ/RTN: 0.733 (4-bit g64), 0.754 (3-bit g128), 0.730 (4-bit channel), 0.737 (8-bit tensor)
    assert output_error(W, result.weight, X) < 0.85 * output_error(W, rtn(W, spec).dequantize(), X)
    # the dequantized QWeight is exactly the weight GPTQ computed with
    assert torch.equal(result.qweight.dequantize(), result.weight)


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_groups_are_consistent_and_stored_exactly(data, static_groups):
    X, W, H = data
    spec = WeightQuant(4, False, "group", 32)
    result = gptq(W, H, spec, act_order=True, static_groups=static_groups)
    q = result.qweight
    assert torch.equal(q.dequantize(), result.weight)
    assert (q.g_idx is None) == static_groups
    if q.g_idx is not None:
        assert torch.bincount(q.g_idx.long()).tolist() == [32] * 8  # every group still has group_size columns
    again = QWeight.unpack(q.pack(), q.bits, q.group_size, q.in_features)
    assert torch.equal(again.dequantize(), result.weight)
    # measured GPTQ/RTN: 0.662 (dynamic groups), 0.670 (static groups)
    assert output_error(W, result.weight, X) < 0.8 * output_error(W, rtn(W, spec).dequantize(), X)


def test_the_gptq_step_defaults_to_static_groups_under_act_order_only(data):
    """GPTQ(act_order=True) keeps groups in column order (no g_idx: exportable), its measured best order; without
    act-order the default static_groups changes nothing: groups are still fitted lazily as the sweep enters them."""
    from lowbit.methods.base import Compression, LinearStats
    from lowbit.recipe import GPTQ

    _, W, H = data
    spec = WeightQuant(4, False, "group", 32)

    def step_result(step):
        c = Compression(weight=W.clone())
        step.compress(c, LinearStats(hessian=H.clone()))
        return c.qweight

    act_order = step_result(GPTQ(spec, act_order=True))
    assert act_order.g_idx is None
    assert torch.equal(act_order.dequantize(), gptq(W, H, spec, act_order=True, static_groups=True).weight)
    desc_act = step_result(GPTQ(spec, act_order=True, static_groups=False))
    assert desc_act.g_idx is not None and not torch.equal(desc_act.dequantize(), act_order.dequantize())
    column = step_result(GPTQ(spec)).dequantize()
    assert torch.equal(column, gptq(W, H, spec).weight)
    assert not torch.equal(column, gptq(W, H, spec, upfront_groups=True).weight)


@pytest.mark.parametrize("act_order", [False, True])
def test_upfront_groups_take_the_original_weights_grids(data, act_order):
    """Up-front fitting: every group's scale/zero is RTN's on the ORIGINAL weights (in the sweep's group order
    under act-order), whatever GPTQ's updates did; lazy fitting reads the updated weights and differs."""
    X, W, H = data
    spec = WeightQuant(4, False, "group", 32)
    upfront = gptq(W, H, spec, act_order=act_order, upfront_groups=True)
    lazy = gptq(W, H, spec, act_order=act_order)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    reference = rtn(W[:, perm], spec)  # groups of 32 consecutive columns in sweep order
    assert torch.equal(upfront.qweight.scale, reference.scale) and torch.equal(upfront.qweight.zero, reference.zero)
    assert not torch.equal(lazy.qweight.scale[:, 1:], reference.scale[:, 1:])  # group 0 is fitted before updates
    assert torch.equal(upfront.qweight.dequantize(), upfront.weight)
    assert (upfront.qweight.g_idx is not None) == act_order
    assert output_error(W, upfront.weight, X) < 0.8 * output_error(W, rtn(W, spec).dequantize(), X)


def test_full_shrink_is_round_to_nearest(data):
    """shrink=1 leaves H diagonal: no column's error reaches another, so GPTQ is RTN, bit for bit."""
    _, W, H = data
    spec = WeightQuant(4, False, "group", 64)
    assert torch.equal(gptq(W, H, spec, shrink=1.0).weight, rtn(W, spec).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_shrink_generalizes_when_tokens_are_few(act_order):
    """768 calibration tokens for 512 input channels with 1% outlier channels (the down_proj picture): GPTQ fits the
    calibration set's noise and loses to RTN on fresh tokens from the same distribution, more so with act-order;
    shrinking H's off-diagonal by 20% makes it win. Measured held-out error / RTN's: 1.83 (2.13 act-order) at
    shrink 0, 0.92 (0.94) at 0.2."""
    mixing = torch.randn(16, 512, generator=torch.Generator().manual_seed(7))

    def draw(tokens: int, seed: int) -> torch.Tensor:
        shared = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed)) @ mixing
        return outlier_inputs(tokens=tokens, features=512, seed=seed) + shared

    calibration, held_out = draw(768, 3), draw(4096, 4)
    W, H = random_weight(128, 512), hessian(calibration)
    spec = WeightQuant(4, False, "group", 64)
    error = {s: output_error(W, gptq(W, H, spec, act_order=act_order, shrink=s).weight, held_out) for s in (0, 0.2)}
    rounded = output_error(W, rtn(W, spec).dequantize(), held_out)
    assert error[0] > 1.5 * rounded
    assert error[0.2] < 0.97 * rounded


def test_gptq_keeps_a_pruning_mask(data):
    X, W, H = data
    mask = prune_mask(wanda_scores(W, X.norm(dim=0)), None, (2, 4), per_row=True)
    W_pruned = W.masked_fill(mask, 0)
    result = gptq(W_pruned, H, WeightQuant(4, False, "group", 64), keep_mask=~mask)
    assert torch.all(result.weight[mask] == 0)
    assert nm_violations(result.weight, 2, 4) == 0


def test_damping_is_raised_when_cholesky_fails():
    v = torch.randn(16, 1)
    H = torch.eye(16) - 1.5 * (v @ v.T) / (v.T @ v)  # one negative eigenvalue (-0.5)
    inv = inverse_hessian(H, 0.01)
    assert inv.retries > 0 and inv.damp > 0.01


def test_dead_inputs_do_not_break_gptq(data):
    X, W, _ = data
    X = X.clone()
    X[:, :10] = 0
    result = gptq(W, hessian(X), WeightQuant(4, False, "group", 64))
    assert torch.all(result.weight[:, :10] == 0)
    assert torch.isfinite(result.weight).all()


def test_sparsegpt_beats_wanda_at_half_sparsity(data):
    X, W, H = data
    wanda = W.masked_fill(prune_mask(wanda_scores(W, X.norm(dim=0)), 0.5, None, per_row=True), 0)
    result = sparsegpt(W, H, 0.5)
    assert abs(float((result.weight == 0).float().mean()) - 0.5) < 0.01
    # measured SparseGPT/Wanda: 0.366 (Wanda ignores the correlations SparseGPT's reconstruction uses)
    assert output_error(W, result.weight, X) < 0.6 * output_error(W, wanda, X)


def test_sparsegpt_two_four_with_joint_quantization(data):
    X, W, H = data
    spec = WeightQuant(4, False, "group", 64)
    result = sparsegpt(W, H, 0.0, nm=(2, 4), spec=spec)
    assert nm_violations(result.weight, 2, 4) == 0
    assert torch.equal(result.qweight.dequantize(), result.weight)


def test_hessian_can_leave_the_first_positions_out():
    x = torch.randn(3, 6, 4)
    x[:, 0] *= 1000  # a massive activation on every sequence's first position
    obs = HessianObserver(skip_first=1)
    obs.add_batch(x[:2])
    obs.add_batch(x[2:])
    rest = x[:, 1:].reshape(-1, 4)
    assert torch.allclose(obs.H, 2 * rest.T @ rest / rest.shape[0], rtol=1e-4, atol=1e-4)
