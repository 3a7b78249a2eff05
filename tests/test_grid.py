"""RTN and the shared integer grid: exact grid points, granularities, QWeight storage round trips."""

import pytest
import torch

from lowbit.numerics.grid import fit_scale_zero
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import rtn
from lowbit.recipe import WeightQuant
from metrics import output_error
from toy import outlier_inputs, random_weight


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_are_in_range_and_pack_round_trip_is_exact(bits, granularity, symmetric):
    W = random_weight(24, 80)  # 80 = 2 groups of 32 plus a partial group of 16
    q = rtn(W, WeightQuant(bits, symmetric, granularity, group_size=32))
    assert int(q.codes.max()) < 2**bits
    n_groups = {"tensor": 1, "channel": 1, "group": 3}[granularity]
    assert q.scale.shape == ((1 if granularity == "tensor" else 24), n_groups)
    again = QWeight.unpack(q.pack(), q.bits, q.group_size, q.in_features)
    assert torch.equal(again.dequantize(), q.dequantize())


def test_zero_is_exact_and_absmax_is_a_grid_point():
    W = random_weight(16, 64)
    W[:, ::3] = 0.0
    for sym in (True, False):
        W_hat = rtn(W, WeightQuant(4, sym, "channel")).dequantize()
        assert torch.all(W_hat[:, ::3] == 0)
    W_hat = rtn(W, WeightQuant(8, True, "channel")).dequantize()
    rows = torch.arange(16)
    j = W.abs().argmax(dim=1)
    assert torch.allclose(W_hat[rows, j], W[rows, j], rtol=1e-3)


def test_error_falls_with_bits_and_finer_granularity():
    W = random_weight(64, 256)
    W[:, 7] *= 20  # an outlier weight column stretches coarse grids
    X = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    errs = {b: output_error(W, rtn(W, WeightQuant(b, False, "channel")).dequantize(), X) for b in (2, 3, 4, 8)}
    # measured: 2-bit 0.573, 3-bit 0.438, 4-bit 0.254, 8-bit 0.0151 (ratios 0.76, 0.58, 0.060: each bit halves the
    # step; ratios within 0.67-0.77, 0.50-0.60, 0.059-0.061 over input seeds 0-4)
    assert errs[3] < 0.85 * errs[2] and errs[4] < 0.75 * errs[3] and errs[8] < 0.1 * errs[4]
    coarse = [output_error(W, rtn(W, WeightQuant(4, False, g, 32)).dequantize(), X) for g in ("tensor", "channel", "group")]
    # measured: tensor 0.610, channel 0.254, g32 0.0967 (ratios 0.42, 0.38; at most 0.42, 0.39 over seeds 0-4)
    assert coarse[1] < 0.6 * coarse[0] and coarse[2] < 0.6 * coarse[1]


def test_scales_are_float16_exact():
    scale, _ = fit_scale_zero(torch.tensor([-0.3]), torch.tensor([0.7]), 4, False)
    assert scale.half().float().item() == scale.item()


def test_rtn_on_outlier_inputs_is_the_baseline_other_methods_must_beat():
    X = outlier_inputs()
    W = random_weight()
    err = output_error(W, rtn(W, WeightQuant(3, False, "group", 128)).dequantize(), X)
    assert 0.0 < err < 1.0


def test_activation_quantization_is_the_grid_formula_bit_for_bit():
    """quantize_activations computes round_to_grid's codes in place (for speed): the same bits as the formula
    (q - zero) * scale on fresh tensors, for per-token and per-tensor, symmetric, asymmetric and static grids,
    with saturating static inputs, all-zero rows and tiny negative inputs (round(-0.3) is -0.0; the grid gives +0)."""
    from lowbit.numerics.activations import _range, quantize_activations, static_scale_from_absmax
    from lowbit.numerics.grid import fake_quantize, fit_scale_zero, round_to_grid, symmetric_zero

    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.linspace(0.1, 30.0, 40)
    x[1] = 0.0
    x[2, :5] = -1e-3
    before = x.clone()
    static = static_scale_from_absmax(torch.tensor(5.0), 8)  # inputs reach 30: saturate
    for bits, per_token, symmetric, scale in [(8, True, True, None), (8, False, True, None), (4, True, True, None),
                                              (8, True, False, None), (4, False, False, None), (8, False, True, static)]:
        if scale is not None:
            zero = torch.tensor(float(symmetric_zero(bits)))
            expected = (round_to_grid(x, scale, zero, bits) - zero) * scale
        else:
            s, zero = fit_scale_zero(*_range(x, per_token), bits, symmetric, storable=False)
            expected = fake_quantize(x, s, zero, bits)
        got = quantize_activations(x, bits, per_token, symmetric, scale)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (bits, per_token, symmetric)
        half = quantize_activations(x.bfloat16(), bits, per_token, symmetric, scale)  # computed in float32
        if scale is None:
            s, zero = fit_scale_zero(*_range(x.bfloat16().float(), per_token), bits, symmetric, storable=False)
            expected = fake_quantize(x.bfloat16().float(), s, zero, bits)
        else:
            expected = (round_to_grid(x.bfloat16().float(), scale, zero, bits) - zero) * scale
        assert torch.equal(half.view(torch.int16), expected.bfloat16().view(torch.int16))
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))  # the caller's tensor is left as it was
    saturated = quantize_activations(x, 8, False, True, static)  # codes -128 .. 127, not wrapped around
    assert saturated.min() == -128 * static and saturated.max() == 127 * static
