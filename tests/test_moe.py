"""Mixture-of-experts models (models/experts.py): fused 3-D experts split into per-expert Linears without changing the
function, every weight-only method and SmoothQuant W8A8 on the experts of five families, routers kept in float, experts
the router never picks still calibrated, hub checkpoints read per expert, and a saved model loading back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.errors import LowbitError
from lowbit.models.arch import arch_for
from lowbit.models.experts import RoutedExperts, all_tokens_to_all_experts, check_unfolding, is_router, unfuse_experts
from lowbit.runtime.registry import is_runtime_module
from lowbit.recipe import AWQ, GPTQ, RTN, ActQuant, Recipe, SmoothQuant, WeightQuant
from toy import MOE, byte_tokenizer, calibration, toy_model

W4 = WeightQuant(4, False, "group", 32)
METHODS = {
    "rtn": (RTN(W4),),
    "gptq": (GPTQ(W4),),
    "awq": (AWQ(W4, n_grid=5, replay_sequences=2, clip_tokens=32),),
    "smoothquant-w8a8": (SmoothQuant(0.5), RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")),
}
# relative logits error ||q - f|| / ||f|| each method must stay within on these toys (measured 0.08-0.15 for W4 g32,
# 0.009-0.013 for W8A8; a fold that changed the function, or an expert left random, gives errors near 1)
TOLERANCE = {"rtn": 0.3, "gptq": 0.3, "awq": 0.3, "smoothquant-w8a8": 0.05}
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model_type", MOE)
def test_split_experts_compute_what_the_fused_ones_did(model_type):
    model = toy_model(model_type)
    reference = logits(model)
    assert unfuse_experts(model)
    assert not any(p.dim() == 3 for p in model.parameters())
    assert torch.allclose(logits(model), reference, atol=1e-5, rtol=0)
    with all_tokens_to_all_experts(model):  # the calibration path: every expert on every token
        assert torch.allclose(logits(model), reference, atol=1e-5, rtol=0)


def test_discovered_structure_of_a_moe_block():
    model = toy_model("mixtral")
    unfuse_experts(model)
    arch = arch_for("mixtral", model)
    mlp = next(g for g in arch.groups if g.prev == "post_attention_layernorm")
    assert set(mlp.linears) == {f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")}
    assert mlp.passengers == ("mlp.gate",) and mlp.inspect == "mlp.experts"
    # one stage for every expert's gate/up, one for every expert's down_proj (not one per expert)
    assert arch.sequential[-1] == tuple(f"mlp.experts.{e}.down_proj" for e in range(4))
    assert is_router(model.model.layers[0].mlp.gate)


def test_a_dense_first_layer_and_moe_layers_are_traced_each():
    """DeepSeek-V3's checkpoints start with dense layers (first_k_dense_replace): each build of block is traced,
    and each block gets the groups and stages of its own build."""
    model = toy_model("deepseek_v3")
    unfuse_experts(model)
    arch = arch_for("deepseek_v3", model)
    dense, moe = model.model.layers
    assert arch.per_block
    mlp_groups = [g for g in arch.groups if g.prev == "post_attention_layernorm"]
    assert [arch.applies(g, dense) for g in mlp_groups] == [True, False]
    assert [arch.applies(g, moe) for g in mlp_groups] == [False, True]
    assert set(mlp_groups[1].linears) >= {"mlp.shared_experts.gate_proj", "mlp.experts.3.up_proj"}
    assert mlp_groups[1].passengers == ("mlp.gate",)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", MOE)
def test_every_method_quantizes_every_expert(model_type, method):
    reference = logits(toy_model(model_type))
    model = lowbit.quantize(toy_model(model_type), METHODS[method], calibration(), batch_size=4)
    assert relative_error(logits(model), reference) < TOLERANCE[method]
    names = {row.name for block in model.lowbit_info.report.blocks for row in block.linears}
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    for e in range(experts.num_experts):  # a report row for every expert's every projection
        assert f"model.layers.1.mlp.experts.{e}.down_proj" in names
        assert is_runtime_module(experts.expert(e).down_proj)
    routers = [m for m in model.modules() if is_router(m)]
    assert routers and all(type(p) is nn.Parameter and p.dtype == torch.float32 for r in routers for p in r.parameters())
    if method == "smoothquant-w8a8":
        folds = [f for block in model.lowbit_info.report.blocks for f in block.folds]
        assert folds and all(f.applied for f in folds), [f.reason for f in folds if not f.applied]


def _without_expert_3(router: nn.Module, args: tuple, out: tuple) -> tuple:
    """Mixtral's routing (softmax, top-2, renormalised) with expert 3's logit at -inf: it never gets a token."""
    router_logits = out[0].clone()
    router_logits[:, 3] = -torch.inf
    top, index = torch.topk(torch.softmax(router_logits.float(), dim=-1), 2, dim=-1)
    return router_logits, top / top.sum(dim=-1, keepdim=True), index


def test_an_expert_the_router_never_picks_is_still_calibrated():
    """No calibration token is routed to expert 3. It is still quantized from the statistics of every token, as
    llm-compressor's calibrate_all_experts: GPTQ's error on those tokens is well below RTN's."""
    def starved() -> nn.Module:
        model = toy_model("mixtral")
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(_without_expert_3)
        return model

    counts = torch.zeros(4)

    def count(router: nn.Module, args: tuple, out: tuple) -> None:
        counts.add_(torch.bincount(out[2].flatten(), minlength=4).float())

    model = starved()
    model.model.layers[0].mlp.gate.register_forward_hook(count)
    model(calibration())
    assert counts[3] == 0 and counts[:3].sum() > 0
    rows = {}
    for name, recipe in (("gptq", (GPTQ(W4),)), ("rtn", (RTN(W4),))):
        quantized = lowbit.quantize(starved(), recipe, calibration(), batch_size=4)
        rows[name] = {r.name: r.rel_error for b in quantized.lowbit_info.report.blocks for r in b.linears}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.3.{proj}"
        assert rows["gptq"][name] < 0.9 * rows["rtn"][name], (name, rows["gptq"][name], rows["rtn"][name])


def test_a_budget_refuses_an_expert_no_calibration_token_reached():
    """A budget plans by each Linear's loss gradient; an expert the router never picks has none, and would be
    planned onto the fewest bits: refused in one line, naming it."""
    model = toy_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_without_expert_3)
    recipe = Recipe(steps=(RTN(W4),), budget=4.5)
    with pytest.raises(LowbitError, match="no calibration token's loss reached .* model.layers.0.mlp.experts.3"):
        lowbit.quantize(model, recipe, calibration(), batch_size=4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("model_type", MOE)
def test_a_hub_checkpoint_quantizes_block_by_block_and_loads_back_exactly(model_type, method, tmp_path):
    """save_pretrained writes experts as the hub does (Mixtral block_sparse_moe.experts.3.w1, Qwen experts.3.gate_proj):
    read per expert from disk, quantized, written, and loaded by lowbit.load into a model whose logits equal the
    in-memory quantized (fake-quant) model's bit for bit."""
    source = tmp_path / "hf"
    toy_model(model_type).save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    recipe = Recipe(METHODS[method], name=method)
    quantize_checkpoint(source, recipe, calibration(), tmp_path / "q", batch_size=4, progress=False)
    loaded = lowbit.load(tmp_path / "q")
    in_memory = lowbit.quantize(toy_model(model_type), recipe.steps, calibration(), batch_size=4)
    assert torch.equal(logits(loaded), logits(in_memory))
    config = json.loads((tmp_path / "q" / "lowbit_config.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj" in config["modules"]
    assert not any("gate" in name.rsplit(".", 1)[-1] and "proj" not in name for name in config["modules"])  # routers
    lowbit.save(in_memory, tmp_path / "api", tokenizer=byte_tokenizer())
    assert torch.equal(logits(lowbit.load(tmp_path / "api")), logits(in_memory))


def test_a_checkpoint_with_stacked_experts_is_read_in_slices(tmp_path):
    """GraniteMoE's checkpoints store each layer's experts as one [E, 2I, H] tensor (input_linear): each expert's
    Linears are read as slices of it."""
    from transformers import AutoModelForCausalLM, GraniteMoeConfig

    torch.manual_seed(0)
    config = GraniteMoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=320)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert any(k.endswith("input_linear.weight") for k in f.keys())
    quantize_checkpoint(tmp_path / "hf", Recipe((RTN(WeightQuant(8, True, "channel")),), name="rtn"), None, tmp_path / "q",
                        progress=False)
    assert relative_error(logits(lowbit.load(tmp_path / "q")), logits(model)) < 0.02


def test_an_experts_class_that_does_not_split_exactly_is_refused():
    class Doubled(MixtralExperts):  # a forward that does more than the per-expert loop
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    fused = toy_model("mixtral").model.layers[0].mlp.experts
    fused.__class__ = Doubled
    with pytest.raises(LowbitError, match="cannot be split into Linears"):
        check_unfolding(Doubled, fused)


def test_compressed_tensors_export_holds_every_expert_under_the_hub_names(tmp_path):
    """vLLM reads a Mixtral compressed-tensors checkpoint by the hub's names (block_sparse_moe.experts.3.w1) with the
    router left float: every expert's packed weights are there under those names and decompress, with
    compressed-tensors' own decompressor, to lowbit's weights exactly; the routers are in the ignore list."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from lowbit.export.compressed_tensors import compressed_state_dict

    model = lowbit.quantize(toy_model("mixtral"), (GPTQ(W4),), calibration(), batch_size=4)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    state, config = compressed_state_dict(loaded)
    assert not any(".mlp." in k for k in state), [k for k in state if ".mlp." in k][:3]
    assert {f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)} <= set(config["ignore"])
    scheme = QuantizationScheme(targets=["Linear"], weights=config["config_groups"]["group_0"]["weights"])
    experts = loaded.model.layers[1].mlp.experts
    for e in range(experts.num_experts):
        for hub, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            prefix = f"model.layers.1.block_sparse_moe.experts.{e}.{hub}."
            local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(weight.float(), getattr(experts.expert(e), proj).dequantized_weight())
    assert state["model.layers.1.block_sparse_moe.gate.weight"].shape == (4, 64)


def test_an_expert_overflowing_on_a_token_it_is_not_routed_contributes_nothing():
    """Calibration runs every expert on every token; where an expert overflows on a token the router did not send
    it (inf * routing weight 0 = NaN), that token's output is still the routed experts' sum."""
    model = toy_model("mixtral")
    unfuse_experts(model)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(6, 64)
    index = torch.tensor([[0, 1]] * 6)
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        experts.expert(3).down_proj.weight.fill_(float("inf"))  # expert 3 is never routed here
        routed = experts(hidden, index, weights)
        with all_tokens_to_all_experts(model):
            dense = experts(hidden, index, weights)
    assert torch.isfinite(dense).all() and torch.allclose(dense, routed, atol=1e-6)


def test_inspect_sees_every_expert_and_one_row_per_input():
    from lowbit.pipeline.inspect import inspect_model
    from lowbit.pipeline.loop import InMemoryStore

    inspection = inspect_model(InMemoryStore(toy_model("mixtral")), calibration()[:1, :3], batch_size=1)
    names = [s.name for s in inspection.inputs if s.block == 0]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                     "model.layers.0.mlp.experts.0.gate_proj",
                     *(f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4))]
