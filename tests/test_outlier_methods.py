"""AWQ, SmoothQuant, LLM.int8() and activation quantization against their naive baselines, on one Linear whose
inputs carry injected outlier channels (the failure each method exists to fix)."""

import torch
from torch import nn

from lowbit.numerics.activations import quantize_activations, static_scale_from_absmax
from lowbit.numerics.awq_clip import apply_clip, awq_clip
from lowbit.numerics.rtn import rtn
from lowbit.numerics.scales import awq_scales, smoothquant_scales
from lowbit.methods.awq import search_awq_scale
from lowbit.pipeline.observers import TokenSampleObserver
from lowbit.recipe import WeightQuant
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.llm_int8 import Int8OutlierLinear, outlier_columns
from metrics import output_error, output_error_of_outputs
from toy import outlier_inputs, random_weight

W3 = WeightQuant(3, False, "group", 128)
W8 = WeightQuant(8, True, "channel")


def test_awq_scale_search_beats_rtn():
    X, W = outlier_inputs(scale=20.0), random_weight()
    linear = nn.Linear(256, 128, bias=False)
    linear.weight.data = W.clone()
    s = search_awq_scale([linear], X.abs().mean(dim=0), W3, 20, lambda: [linear(X)])
    assert torch.equal(linear.weight, W)  # the search restores the weights
    awq = rtn(W * s, W3).dequantize()  # W * s sees inputs X / s
    # measured: AWQ 0.1371, RTN 0.1951 (ratio 0.70)
    assert output_error_of_outputs(W, (X / s) @ awq.T, X) < 0.85 * output_error(W, rtn(W, W3).dequantize(), X)


def test_awq_scales_are_normalised():
    s = awq_scales(torch.rand(64) + 0.1, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(awq_scales(torch.rand(64), 0.0), torch.ones(64))


def test_awq_clip_never_hurts_and_usually_helps():
    X, W = outlier_inputs(scale=5.0), random_weight()
    W[:, 5] *= 8  # a few large weights make min-max grids coarse
    max_val = awq_clip(W, X[:256], W3)
    clipped = rtn(apply_clip(W, max_val, W3), W3).dequantize()
    # measured: clipped 0.2522, min-max RTN 0.2888 (ratio 0.87)
    assert output_error(W, clipped, X) < 0.95 * output_error(W, rtn(W, W3).dequantize(), X)


def test_awq_clip_search_sees_the_attention_sinks():
    x = torch.randn(16, 64, 256, generator=torch.Generator().manual_seed(0))  # [sequences, positions, in]
    x[:, :, 5] *= 0.01  # column 5 is idle on ordinary tokens...
    x[:, 0, 5] = 300.0  # ...and massive at every sequence's first position: an attention sink
    W = random_weight()
    W[:, 5] *= 8  # the large weights a sink's massive channel goes through
    uniform, with_sinks = TokenSampleObserver(64, seed=0), TokenSampleObserver(64, seed=0, first_positions=1)
    for observer in (uniform, with_sinks):
        observer.add_batch(x[:8])
        observer.add_batch(x[8:])
    sinks = x[:, 0]  # [16, in]
    assert not (uniform.rows[:, 5] == 300.0).any()  # this draw holds no sink (1 expected in 64 of 1,024)
    assert with_sinks.rows.shape[0] == 64 + 16 and int((with_sinks.rows[:, 5] == 300.0).sum()) == 16
    # each sink counts once, each drawn row for the 1,008 / 64 it stands for: the sample's weights sum to every row
    assert torch.allclose(with_sinks.weights.sum(), torch.tensor(1024.0))
    assert torch.equal(with_sinks.weights[with_sinks.rows[:, 5] == 300.0], torch.ones(16))
    errors = {}
    for name, observer in (("uniform", uniform), ("with sinks", with_sinks)):
        max_val = awq_clip(W, observer.rows, W3, token_weights=observer.weights)
        errors[name] = output_error(W, rtn(apply_clip(W, max_val, W3), W3).dequantize(), sinks)
    # measured on the sinks: uniform sample 0.427 (min-max RTN 0.057), with the sinks 0.045 (ratio 0.11)
    assert errors["with sinks"] < 0.5 * errors["uniform"], errors


def test_smoothquant_w8a8_beats_naive_w8a8():
    X, W = outlier_inputs(), random_weight()
    naive = quantize_activations(X, 8, per_token=False, symmetric=True) @ rtn(W, W8).dequantize().T
    s = smoothquant_scales(X.abs().amax(dim=0), W.abs().amax(dim=0), 0.5)
    smooth = quantize_activations(X / s, 8, per_token=False, symmetric=True) @ rtn(W * s, W8).dequantize().T
    # measured: smoothed 0.0144, naive 0.0743 (ratio 0.19)
    assert output_error_of_outputs(W, smooth, X) < 0.5 * output_error_of_outputs(W, naive, X)


def _modules(W):
    q = rtn(W, W8)
    return (
        Int8OutlierLinear.from_qweight(q, None, threshold=6.0),
        ActQuantLinear.from_qweight(q, None, act_bits=8, act_per_token=True, act_symmetric=True),
    )


def test_llm_int8_beats_plain_int8_and_finds_the_outlier_columns():
    X, W = outlier_inputs(), random_weight()
    mixed, plain = _modules(W)
    # measured: LLM.int8() 0.0067, per-token W8A8 0.0310 (ratio 0.22)
    assert output_error_of_outputs(W, mixed(X), X) < 0.5 * output_error_of_outputs(W, plain(X), X)
    assert int(outlier_columns(X, 6.0).sum()) == 2  # the injected 1% of 256 channels


def test_llm_int8_without_outliers_is_plain_int8():
    X, W = torch.randn(64, 256) * 0.5, random_weight()
    mixed, plain = _modules(W)
    assert torch.equal(mixed(X), plain(X))


def test_per_token_activation_quantization_handles_outlier_tokens():
    X = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    X[::16] *= 100  # a few outlier tokens
    per_tensor = quantize_activations(X, 8, per_token=False, symmetric=True)
    per_token = quantize_activations(X, 8, per_token=True, symmetric=True)
    # measured ||error||: per-token 14.0, per-tensor 67.6 (ratio 0.21; 0.20-0.21 over seeds 0-4)
    assert (per_token - X).norm() < 0.5 * (per_tensor - X).norm()


def test_static_scale_matches_dynamic_on_the_calibration_data():
    X = torch.randn(32, 64)
    static = quantize_activations(X, 8, False, True, static_scale_from_absmax(X.abs().max(), 8))
    assert torch.allclose(static, quantize_activations(X, 8, False, True))
