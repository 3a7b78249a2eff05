"""The embedding and head quantized (Recipe.embeddings / Recipe.head): packed lookups that equal the fake-quant
table, tied tables stored once, both save paths, every backend, the recipe's JSON and names, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.errors import LowbitError
from lowbit.models.checkpoint import CheckpointReader
from lowbit.presets import resolve_recipe
from lowbit.recipe import RTN, Recipe, WeightQuant
from lowbit.runtime.embedding import QuantizedEmbedding, TiedQuantizedHead
from toy import calibration, save_toy, toy_model

# untied with biases; tied with Gemma's scaled embedding (sqrt(hidden) times each row); untied Qwen2
MODEL_TYPES = ("llama", "gemma3_text", "qwen2")
INT8 = WeightQuant(bits=8, symmetric=False, group_size=32)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fake_quant_reference(model: nn.Module) -> nn.Module:
    """``model`` with its packed embedding and head swapped for float modules holding the dequantized tables (the
    model a fake-quant evaluation computes): the packed modules must give exactly its logits."""
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding)
    table = emb.float_table(torch.float32)
    lookup = nn.Embedding.from_pretrained(table, freeze=True)
    path = next(n for n, m in model.named_modules() if m is emb)
    head = model.get_output_embeddings()
    head_path = next(n for n, m in model.named_modules() if m is head)
    if emb.embed_scale is not None:
        scale = emb.embed_scale
        lookup.register_forward_hook(lambda _m, _a, out: out * torch.tensor(scale, dtype=out.dtype))
    model.set_submodule(path, lookup)
    if isinstance(head, TiedQuantizedHead):
        linear = nn.Linear(table.shape[1], table.shape[0], bias=False)
        linear.weight.data = table
    else:
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        linear.weight.data = head.dequantized_weight(torch.float32)
        if head.bias is not None:
            linear.bias.data = head.bias
    model.set_submodule(head_path, linear)
    return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_quantized_embedding_and_head_equal_the_fake_quant_tables_on_every_path(model_type: str, tmp_path: Path) -> None:
    ids = calibration(2, 24, seed=5)
    model = toy_model(model_type)
    float_logits = logits(model, ids)
    recipe = Recipe((RTN(WeightQuant(group_size=32)),), embeddings=INT8, head=INT8, name="e8")
    lowbit.quantize(model, recipe, None)
    packed = logits(model, ids)
    assert 0 < (packed - float_logits).norm() / float_logits.norm() < 0.2  # quantized, and still the same model
    tied = model.config.tie_word_embeddings
    assert isinstance(model.get_output_embeddings(), TiedQuantizedHead) == tied

    lowbit.save(model, tmp_path / "saved")
    for backend in ("exact", "dequantized"):  # bit for bit what the calibration loop computed
        assert torch.equal(logits(lowbit.load(tmp_path / "saved", backend=backend), ids), packed), backend
    fast = logits(lowbit.load(tmp_path / "saved", backend="fast"), ids)  # int kernels: close, not exact
    assert (fast - packed).norm() / packed.norm() < 0.05
    # the checkpoint path (block by block from disk, the embedding and head packed as they are copied) agrees
    source = save_toy(model_type, tmp_path / "source")
    quantize_checkpoint(source, recipe, None, tmp_path / "checkpoint", progress=False)
    assert torch.equal(logits(lowbit.load(tmp_path / "checkpoint"), ids), packed)
    stored = CheckpointReader(tmp_path / "checkpoint").keys()
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in stored)
    if tied:  # one table, stored once, read by the head
        assert not any(k.startswith("lm_head.") for k in stored)
        config = json.loads((tmp_path / "checkpoint" / "lowbit_config.json").read_text())
        assert config["tied_head"] == {"head": "lm_head", "embedding": "model.embed_tokens"}
    # the packed lookup and head compute exactly what float modules holding the dequantized tables compute
    assert torch.equal(logits(fake_quant_reference(model), ids), packed)


def test_quantizing_the_embedding_and_head_makes_the_checkpoint_smaller(tmp_path: Path) -> None:
    source = save_toy("gemma3_text", tmp_path / "source")
    sizes = {}
    for name in ("w4g128", "w4g128-e8", "w4g128-e6"):
        quantize_checkpoint(source, resolve_recipe(name), None, tmp_path / name, progress=False)
        sizes[name] = CheckpointReader(tmp_path / name).nbytes()
    assert sizes["w4g128-e6"] < sizes["w4g128-e8"] < sizes["w4g128"]


def test_a_tied_table_takes_one_grid(tmp_path: Path) -> None:
    model = toy_model("gemma3_text")
    recipe = Recipe((RTN(WeightQuant(group_size=32)),), embeddings=INT8, head=WeightQuant(bits=6, group_size=32))
    with pytest.raises(LowbitError, match="tied.*one grid"):
        lowbit.quantize(model, recipe, None)


def test_an_embedding_that_is_not_a_plain_lookup_is_refused() -> None:
    class Positional(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1.0

    model = toy_model("llama")
    emb = model.get_input_embeddings()
    replacement = Positional(emb.num_embeddings, emb.embedding_dim)
    model.set_input_embeddings(replacement)
    with pytest.raises(LowbitError, match="not a plain lookup table"):
        lowbit.quantize(model, resolve_recipe("w4g128-e8"), None)


def test_recipe_json_and_names() -> None:
    recipe = resolve_recipe("w4g128-e6")
    assert recipe.embeddings == recipe.head == WeightQuant(bits=6, symmetric=False, group_size=128)
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert "embeddings" not in resolve_recipe("w4g128").to_dict()  # recipes without them keep their JSON
    point = resolve_recipe("awq-w3g64-e8")
    assert point.name == "awq-w3g64-e8" and point.head == WeightQuant(bits=8, symmetric=False, group_size=128)
    with pytest.raises(LowbitError, match="recipe.*head"):
        Recipe.from_dict({"steps": [{"type": "rtn"}], "head": {"bits": 12}})


def test_a_damaged_tied_head_entry_is_one_line(tmp_path: Path) -> None:
    model = lowbit.quantize(toy_model("gemma3_text"), resolve_recipe("w4g128-e8"), None)
    lowbit.save(model, tmp_path / "q")
    path = tmp_path / "q" / "lowbit_config.json"
    config = json.loads(path.read_text())
    config["tied_head"]["embedding"] = "model.norm"
    path.write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="tied_head names an embedding that is not a quantized one"):
        lowbit.load(tmp_path / "q")


def test_an_untied_head_is_rounded_by_gptq_on_its_own_inputs(tmp_path: Path) -> None:
    """GPTQ fitted to the final norm's outputs beats round-to-nearest on those outputs (same grid, same head)."""
    from lowbit.numerics.rtn import rtn
    from lowbit.recipe import GPTQ

    grid = WeightQuant(bits=3, symmetric=False, group_size=32)
    model = toy_model("llama")
    W = model.get_output_embeddings().weight.detach().clone()
    ids = calibration(8, 32, seed=1)
    lowbit.quantize(model, Recipe((GPTQ(WeightQuant(group_size=32)),), head=grid), ids, batch_size=4)
    head = model.get_output_embeddings()
    inputs: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    logits(model, ids)
    X = torch.cat(inputs)  # [tokens, hidden]: what the quantized model feeds its head

    def output_error(W_hat: torch.Tensor) -> float:
        return float((X @ (W_hat - W).T).norm() / (X @ W.T).norm())

    gptq_error, rtn_error = output_error(head.dequantized_weight()), output_error(rtn(W, grid).dequantize())
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)
    # the checkpoint path collects the same head inputs and rounds the head the same way
    source = save_toy("llama", tmp_path / "source")
    quantize_checkpoint(source, Recipe((GPTQ(WeightQuant(group_size=32)),), head=grid), ids, tmp_path / "q",
                        batch_size=4, progress=False)
    assert torch.equal(lowbit.load(tmp_path / "q").get_output_embeddings().dequantized_weight(), head.dequantized_weight())


@pytest.mark.parametrize("embeddings, head, kinds", [
    (WeightQuant(bits=8, symmetric=True, group_size=32), WeightQuant(bits=4, symmetric=True, group_size=32),
     {"token_embd.weight": "Q8_0", "output.weight": "Q4_0"}),
    (None, WeightQuant(bits=8, symmetric=True, group_size=32), {"token_embd.weight": "F32", "output.weight": "Q8_0"}),
])
def test_gguf_holds_the_quantized_embedding_and_head(tmp_path: Path, monkeypatch, embeddings, head, kinds) -> None:
    """token_embd / output in GGML blocks holding lowbit's codes; transformers reads the file into the same model."""
    import gguf

    from lowbit.api import open_model
    from lowbit.export.gguf import write_gguf
    from toy import byte_tokenizer

    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    recipe = Recipe((RTN(WeightQuant(bits=8, symmetric=True, group_size=32)),), embeddings=embeddings, head=head)
    model = lowbit.quantize(toy_model("llama", biases=False), recipe, None)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    write_gguf(tmp_path / "q", loaded, tmp_path / "m.gguf")
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert {k: stored[k] for k in kinds} == kinds
    ids = calibration(2, 24, seed=5)
    theirs = logits(open_model(str(tmp_path / "m.gguf")).model, ids)
    ours = logits(loaded, ids)
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()


def test_exports_refuse_what_they_cannot_hold(tmp_path: Path) -> None:
    from lowbit.export.gguf import check_recipe_for_gguf

    source = save_toy("llama", tmp_path / "source", biases=False)
    g32 = RTN(WeightQuant(bits=4, symmetric=True, group_size=32))
    with pytest.raises(LowbitError, match="this recipe's embeddings are W6 asym g128: use group_size 32"):
        check_recipe_for_gguf(Recipe((g32,), embeddings=WeightQuant(bits=6, group_size=128)), source)
    with pytest.raises(LowbitError, match="compressed-tensors has no quantized embedding"):
        resolve_recipe("w4g128-e8").check_export("compressed-tensors")


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral", "phi3", "olmo2"])
def test_gptq_head_statistics_run_on_other_untied_architectures(model_type: str) -> None:
    """The pass from the last block's outputs to the head (final norm, whatever else lies between) on other
    families, experts included."""
    from lowbit.recipe import GPTQ

    model = toy_model(model_type)
    if model.config.tie_word_embeddings:
        pytest.skip("tied: the head is rounded with the embedding")
    ids = calibration(4, 24, seed=2)
    reference = logits(model, ids)
    lowbit.quantize(model, Recipe((GPTQ(WeightQuant(group_size=32)),), head=WeightQuant(bits=8, group_size=32)), ids,
                    batch_size=2)
    head = model.get_output_embeddings()
    assert head.bits == 8 and (logits(model, ids) - reference).norm() < 0.2 * reference.norm()


@pytest.mark.parametrize("grid", [WeightQuant(bits=8, symmetric=True, group_size=32),
                                  WeightQuant(bits=4, group_size=32, fit="mse"),
                                  WeightQuant(bits=6, granularity="channel"),
                                  WeightQuant.k_grid("Q4_K"), WeightQuant.k_grid("Q6_K")])
def test_a_table_rounded_in_row_slices_is_the_table_rounded_whole(grid: WeightQuant, monkeypatch) -> None:
    """Large vocabularies are rounded a slice of rows at a time (memory); every row's grid is its own, so the codes
    and scales are those of rounding the whole table."""
    import lowbit.pipeline.outside as outside

    table = torch.randn(1000, 256) * torch.rand(1000, 1) * 3
    whole = outside.quantize_table(table, grid)
    monkeypatch.setattr(outside, "TABLE_ROWS", 96)
    sliced = outside.quantize_table(table, grid)
    assert type(sliced) is type(whole)
    assert all(torch.equal(a, b) for a, b in zip(whole.pack().values(), sliced.pack().values(), strict=True))
    assert torch.equal(sliced.dequantize(), whole.dequantize())
