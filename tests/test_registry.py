"""A method is one module: a step type declared and registered in a test (no other source file touched) runs through
recipe JSON, validation, the block loop, the report, save and load, and the exporters' checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.methods import registry
from lowbit.methods.base import ROUND, Compression, LinearStats, Step, WeightQuant
from lowbit.numerics.rtn import rtn
from lowbit.recipe import AWQ, Recipe
from toy import byte_tokenizer, calibration, toy_model


@dataclass(frozen=True)
class ClippedRTN(Step):
    """Round-to-nearest after clipping every weight to 90% of the matrix's largest magnitude: a trivial method."""

    kind: ClassVar[str] = "clipped_rtn_test"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)

    @property
    def rounds(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"clipped rtn {self.weights.label}"

    def compress(self, c: Compression, stats: LinearStats) -> None:
        limit = 0.9 * c.weight.abs().max()
        c.qweight = rtn(c.weight.clamp(-limit, limit), self.weights)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(registry.STEP_TYPES, ClippedRTN.kind, ClippedRTN)
    return ClippedRTN


def test_a_method_declared_in_one_place_runs_end_to_end(registered, tmp_path):
    recipe = Recipe.from_dict({"steps": [{"type": "clipped_rtn_test", "bits": 8, "symmetric": True,
                                          "granularity": "channel"}]})
    assert isinstance(recipe.steps[0], ClippedRTN) and not recipe.needs_calibration
    reference = toy_model("llama")
    model = lowbit.quantize(toy_model("llama"), recipe, calibration(), batch_size=4)
    rows = [row for block in model.lowbit_info.report.blocks for row in block.linears]
    assert rows and all(row.method == "clipped rtn W8 sym per-channel" for row in rows)
    ids = calibration(n=2, length=16, seed=3)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.2  # 8 bits after a 10% clip: close, not equal
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "q")(ids).logits, ours)
    recipe.check_export("compressed-tensors")  # nothing it produces is foreign to a weight-only export


def test_the_registry_validates_a_new_method_like_the_others(registered):
    grid = {"bits": 4, "group_size": 32}
    with pytest.raises(LowbitError, match="out of order"):  # its stage puts it after transforms
        Recipe.from_dict({"steps": [{"type": "clipped_rtn_test", **grid}, {"type": "awq", **grid}]})
    with pytest.raises(LowbitError, match="one grid per recipe"):  # AWQ's rule applies to any rounding step
        Recipe.from_dict({"steps": [{"type": "awq", "bits": 4, "group_size": 128}, {"type": "clipped_rtn_test", **grid}]})
    with pytest.raises(LowbitError, match="rounds the weights once"):
        Recipe.from_dict({"steps": [{"type": "clipped_rtn_test"}, {"type": "rtn"}]})
    recipe = Recipe((AWQ(WeightQuant(4, False, "group", 32)), ClippedRTN(WeightQuant(4, False, "group", 32))))
    assert recipe.method_label == "awq + clipped rtn W4 asym g32"


def test_a_kind_cannot_be_registered_twice():
    @dataclass(frozen=True)
    class Impostor(Step):
        kind: ClassVar[str] = "rtn"

    with pytest.raises(LowbitError, match="already registered"):
        registry.register(Impostor)


def test_pruning_runs_before_rounding_in_either_listed_order():
    """SparseGPT and GPTQ share the rounding stage: listed either way, the weights are pruned, then rounded."""
    from lowbit.recipe import GPTQ, SparseGPT
    from lowbit.runtime.weight_only import WeightOnlyLinear

    grid = WeightQuant(4, True, "group", 32)
    for steps in ((SparseGPT(), GPTQ(grid)), (GPTQ(grid), SparseGPT())):
        model = lowbit.quantize(toy_model("llama"), steps, calibration(), batch_size=4)
        linear = model.model.layers[0].mlp.down_proj
        assert isinstance(linear, WeightOnlyLinear)  # rounded, not left a float sparse matrix
        assert (linear.dequantized_weight() == 0).float().mean() >= 0.5  # and pruned


def test_a_stored_recipe_loads_under_rules_added_later():
    """An output's recipe was checked when it was written; a composition rule added since (AWQ's grid must be the
    rounding grid) refuses new recipes but never makes an existing output unloadable."""
    stored = {"steps": [{"type": "awq", "bits": 4, "group_size": 32},
                        {"type": "gptq", "bits": 4, "symmetric": True, "group_size": 32}]}
    with pytest.raises(LowbitError, match="one grid per recipe"):
        Recipe.from_dict(stored)
    assert Recipe.from_dict(stored, stored=True).method_label == "awq + gptq W4 sym g32"


def test_a_stored_recipe_reads_back_what_it_was_made_with():
    """A field added with a default that changed the method (AWQ's clip sample keeps the sinks since stop 43): an
    output or report written before it reads back with the value it was made with, so `compare --resume` measures
    such a row again instead of taking it for today's; a new recipe without the field gets today's default."""
    earlier = {"steps": [{"type": "awq", "bits": 4, "group_size": 128}]}
    assert Recipe.from_dict(earlier, stored=True).steps[0].clip_sink_positions == 0
    assert Recipe.from_dict(earlier).steps[0].clip_sink_positions == 1
    assert Recipe.from_dict(earlier, stored=True) != Recipe.from_dict(earlier)
    today = Recipe.from_dict(earlier).to_dict()  # written today: the field is stored and read back as written
    assert Recipe.from_dict(today, stored=True) == Recipe.from_dict(earlier)
