"""AutoRound: its learned rounding is round-to-nearest before any step and is stored exactly as it was trained, each
block is tuned toward the float model's own outputs, and on 2-bit weights it beats GPTQ and round-to-nearest."""

import pytest
import torch

import lowbit
from lowbit import AWQ, GPTQ, RTN, AutoRound, WeightQuant
from lowbit.errors import LowbitError
from lowbit.methods.autoround import AutoRound as AutoRoundStep
from lowbit.numerics.autoround import Rounding, fake_quantize_tuned, tuned_qweight
from lowbit.numerics.rtn import rtn
from lowbit.presets import resolve_recipe
from lowbit.recipe import Recipe
from toy import byte_tokenizer, calibration, random_weight, toy_model

GRIDS = [WeightQuant(bits=3, group_size=128), WeightQuant(bits=4, symmetric=True, group_size=32),
         WeightQuant(bits=8, symmetric=True, granularity="channel"), WeightQuant(bits=2, granularity="tensor")]


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: s.label)
def test_learned_rounding_starts_at_rtn_and_is_stored_as_trained(spec):
    W = random_weight(64, 256)
    assert torch.equal(tuned_qweight(W, spec, Rounding.initial(W, spec)).dequantize(), rtn(W, spec).dequantize())
    r = Rounding.initial(W, spec)
    torch.manual_seed(3)
    r.offset, r.lo, r.hi = torch.rand_like(W) - 0.5, 0.7 + 0.3 * torch.rand_like(r.lo), 0.7 + 0.3 * torch.rand_like(r.hi)
    assert torch.equal(fake_quantize_tuned(W, spec, r), tuned_qweight(W, spec, r).dequantize())
    for t in r.tensors():
        t.requires_grad_(True)
    (fake_quantize_tuned(W, spec, r) * torch.randn_like(W)).sum().backward()  # straight-through gradients
    assert r.offset.grad.abs().sum() > 0 and r.hi.grad.abs().sum() > 0
    assert spec.symmetric or r.lo.grad.abs().sum() > 0


def _logit_error(steps, cal, ids, reference) -> float:
    model = lowbit.quantize(toy_model("llama"), steps, cal, batch_size=4, progress=False)
    with torch.no_grad():
        return float(((model(ids).logits - reference) ** 2).mean())


def test_autoround_beats_gptq_and_rtn_at_two_bits():
    cal, ids = calibration(n=16, length=64), calibration(n=4, length=64, seed=7)
    with torch.no_grad():
        reference = toy_model("llama")(ids).logits
    grid = WeightQuant(bits=2, group_size=32)
    rtn_error = _logit_error([RTN(grid)], cal, ids, reference)
    gptq_error = _logit_error([GPTQ(grid)], cal, ids, reference)
    autoround_error = _logit_error([AutoRound(grid, iters=50)], cal, ids, reference)
    assert autoround_error < 0.6 * gptq_error and gptq_error < rtn_error
    assert _logit_error([AWQ(grid), AutoRound(grid, iters=50)], cal, ids, reference) < 0.6 * gptq_error


def test_each_block_is_tuned_toward_the_float_models_own_outputs(monkeypatch):
    """Block i's targets are the float block i on the float model's inputs to it (not on the quantized stream)."""
    cal = calibration(n=8, length=32)
    float_model = toy_model("llama")
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.setdefault(i, []).append(
        (out[0] if isinstance(out, tuple) else out).detach())) for i, layer in enumerate(float_model.model.layers)]
    with torch.no_grad():
        for b in range(2):
            float_model(cal[4 * b : 4 * b + 4])
    for h in hooks:
        h.remove()
    seen: list[list[torch.Tensor]] = []

    def record(self, ctx, targets, weight_of):
        seen.append([t.clone() for t in targets])
        return {}

    monkeypatch.setattr(AutoRoundStep, "tune_block", record)
    lowbit.quantize(toy_model("llama"), [AutoRound(WeightQuant(bits=2, group_size=32))], cal, batch_size=4, progress=False)
    assert len(seen) == 2
    for i, targets in enumerate(seen):
        for got, expected in zip(targets, outputs[i]):
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_autoround_output_round_trips_and_is_deterministic(tmp_path):
    cal, ids = calibration(n=8, length=32), calibration(n=2, length=24, seed=5)
    recipe = [AutoRound(WeightQuant(bits=3, group_size=32), iters=20)]
    first = lowbit.quantize(toy_model("llama"), recipe, cal, batch_size=4, progress=False)
    second = lowbit.quantize(toy_model("llama"), recipe, cal, batch_size=4, progress=False)
    lowbit.save(first, tmp_path / "q", tokenizer=byte_tokenizer())
    back = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        logits = first(ids).logits
        assert torch.equal(logits, second(ids).logits) and torch.equal(logits, back(ids).logits)
    notes = [linear.note for block in first.lowbit_info.report.blocks for linear in block.linears]
    assert all("block loss" in note for note in notes)
    # a block whose Linears are all left in float is passed through (the float stream still advances)
    skipped = Recipe(tuple(recipe), ignore=("lm_head", "model.layers.0.*"))
    model = lowbit.quantize(toy_model("llama"), skipped, cal, batch_size=4, progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "WeightOnlyLinear"


def test_autoround_names_and_refusals():
    assert resolve_recipe("autoround-w3g128").method_label == "autoround W3 asym g128 200 iters"
    assert [s.kind for s in resolve_recipe("awq-autoround-w2g64").steps] == ["awq", "autoround"]
    with pytest.raises(LowbitError, match="autoround learns the rounding of an integer grid"):
        AutoRound(WeightQuant.k_grid("Q4_K"))
    with pytest.raises(LowbitError, match="autoround learns the rounding of an integer grid"):
        AutoRound(WeightQuant.float_grid("NVFP4"))
    with pytest.raises(LowbitError, match="autoround rounds dense weights"):
        Recipe([lowbit.Prune("wanda", 0.5), AutoRound()])
    with pytest.raises(LowbitError, match="autoround tunes weight-only recipes"):
        Recipe([AutoRound(WeightQuant(bits=8, symmetric=True, granularity="channel")), lowbit.ActQuant(8)])
    with pytest.raises(LowbitError, match="iters must be >= 0"):
        Recipe.from_dict({"steps": [{"type": "autoround", "iters": -1}]})
