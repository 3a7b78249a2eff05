"""llama.cpp's K-quant grids (Q2_K .. Q6_K): lowbit's methods round onto them, the GGUF blocks hold exactly what
lowbit computed (checked against the gguf package's own dequantization), transformers loads the GGUF with lowbit's
logits, widths that are not multiples of 256 fall back as in llama-quantize, and what cannot hold a K grid refuses."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lowbit
from lowbit import GPTQ, RTN, WeightQuant
from lowbit.api import open_model
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.export.ggml_blocks import ggml_blocks
from lowbit.export.gguf import permute_rows, write_gguf
from lowbit.numerics.kquant import K_TYPES, KQWeight, k_rtn
from lowbit.numerics.kquant_mix import LLAMA_FTYPES, LinearPlace, mix_type
from lowbit.numerics.obs import gptq
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import rtn
from lowbit.pipeline.observers import HessianObserver
from lowbit.presets import resolve_recipe
from lowbit.recipe import AWQ, Prune, Recipe
from metrics import output_error
from tiny_gguf import assert_gguf_gives_lowbits_logits
from toy import SPECIAL, VOCAB, byte_tokenizer, calibration, outlier_inputs, random_weight


def heavy_tailed_weight(out_features: int = 16, in_features: int = 512) -> torch.Tensor:
    """A weight with a few large columns, so the sub-blocks' ranges (and their integer scales) differ."""
    W = random_weight(out_features, in_features, seed=3)
    W[:, [5, 300]] *= 25.0
    return W


def dequantized_by_gguf(blocks, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).copy())


@pytest.mark.parametrize("kind", list(K_TYPES))
def test_k_blocks_hold_lowbit_values_bit_for_bit(kind):
    W = heavy_tailed_weight()
    qweight = k_rtn(W, K_TYPES[kind])
    assert isinstance(qweight, KQWeight) and int(qweight.codes.max()) <= (1 << qweight.bits) - 1
    stored_kind, blocks = ggml_blocks(qweight)
    bytes_per_block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)][1]
    assert stored_kind == kind and blocks.shape == (16, 2 * bytes_per_block)
    assert torch.equal(dequantized_by_gguf(blocks, kind), qweight.dequantize())
    # lowbit's own packed form round-trips exactly too
    assert torch.equal(KQWeight.unpack(qweight.pack(), kind, 512).dequantize(), qweight.dequantize())


def test_more_bits_less_error_and_q4_k_matches_its_integer_grid():
    W = heavy_tailed_weight()
    errors = {k: ((k_rtn(W, kt).dequantize() - W).norm() / W.norm()).item() for k, kt in K_TYPES.items()}
    ordered = [errors[k] for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert ordered == sorted(ordered, reverse=True), errors
    # Q4_K's 6-bit sub-scales cost little against float16 scales on the same 32-column asymmetric grid (Q4_1)
    plain = rtn(W, WeightQuant(bits=4, symmetric=False, group_size=32)).dequantize()
    assert errors["Q4_K"] < 1.15 * ((plain - W).norm() / W.norm()).item()


@pytest.mark.parametrize("bits, symmetric, kind", [(5, True, "Q5_0"), (5, False, "Q5_1")])
def test_five_bit_blocks(bits, symmetric, kind):
    qweight = rtn(heavy_tailed_weight(), WeightQuant(bits=bits, symmetric=symmetric, group_size=32))
    stored_kind, blocks = ggml_blocks(qweight)
    restored = dequantized_by_gguf(blocks, kind)
    assert stored_kind == kind
    if symmetric:
        assert torch.equal(restored, qweight.dequantize())
    else:  # m = -zero * scale is stored in float16
        assert torch.allclose(restored, qweight.dequantize(), atol=2e-3 * qweight.dequantize().abs().max().item())


@pytest.mark.parametrize("kind", ["Q3_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_a_k_grid_beats_rounding_to_nearest_on_it(kind, act_order):
    X = outlier_inputs(tokens=1024, features=512)
    W = random_weight(64, 512, seed=2)
    observer = HessianObserver()
    observer.add_batch(X)
    H = observer.H
    grid = WeightQuant.k_grid(kind)
    result = gptq(W, H, grid, act_order=act_order, static_groups=True)
    assert isinstance(result.qweight, KQWeight)
    assert torch.equal(result.qweight.dequantize(), result.weight)  # the sweep's values are the stored grid's
    # as on the integer grids (W3 sym g16: 0.88 in column order, 0.76 with act-order on these inputs)
    assert output_error(W, result.weight, X) < 0.95 * output_error(W, rtn(W, grid).dequantize(), X)


def test_a_width_that_is_not_a_multiple_of_256_falls_back_as_llama_quantize_does():
    W = random_weight(8, 576)  # SmolLM2's hidden size
    expected = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    for kind, fallback in expected.items():
        qweight = rtn(W, WeightQuant.k_grid(kind))
        assert isinstance(qweight, QWeight) and ggml_blocks(qweight)[0] == fallback


def k_llama(layers: int = 2, kv_heads: int = 2, hidden: int = 256, tied: bool = False) -> torch.nn.Module:
    """A tiny Llama whose Linears are 256 or 512 wide, so they hold K blocks (the toy models' 64 do not)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256,
                         tie_word_embeddings=tied, **SPECIAL)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("recipe", ["gptq-q4_k", "imatrix-q6_k", "gptq-q3_k-actorder"])
def test_k_quant_model_saves_loads_and_exports_to_gguf_with_the_same_logits(tmp_path, monkeypatch, recipe):
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")  # transformers dequantizes the GGUF to these exact values
    model = lowbit.quantize(k_llama(), resolve_recipe(recipe), calibration(n=4, length=32), batch_size=2)
    folder = tmp_path / "q"
    lowbit.save(model, folder, tokenizer=byte_tokenizer())
    loaded = lowbit.load(folder)
    ids = calibration(n=2, length=24, seed=5)
    kind = WeightQuant.k_grid(recipe.split("-")[-2] if "actorder" in recipe else recipe.split("-")[-1]).ggml
    with torch.no_grad():
        ours = loaded(ids).logits
        assert torch.equal(ours, model(ids).logits)
    types = write_gguf(folder, loaded, tmp_path / "m.gguf")
    assert set(types.values()) == {kind} and len(types) == 2 * 7
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    expected = permute_rows(loaded.model.layers[0].self_attn.k_proj.dequantized_weight(), 2)
    assert torch.equal(dequantized_by_gguf(stored.data, kind).reshape(expected.shape), expected)
    with torch.no_grad():
        theirs = open_model(str(tmp_path / "m.gguf")).model(ids).logits
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()


def test_k_recipes_round_trip_through_json():
    for name in ("gptq-q4_k_m", "awq-q6_k", "q3_k_s", "gptq-q5_k-actorder", "imatrix-q4_k_m"):
        recipe = resolve_recipe(name)
        assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


def test_k_grid_refusals(tmp_path, capsys):
    q4k = WeightQuant.k_grid("Q4_K")
    with pytest.raises(LowbitError, match="group_size=32"):
        WeightQuant(bits=4, group_size=128, ggml="Q4_K")
    with pytest.raises(LowbitError, match="must be a K type"):
        WeightQuant(bits=4, ggml="Q7_K")
    with pytest.raises(LowbitError, match="pruned"):
        Recipe((Prune("wanda", 0.5), RTN(q4k)))
    with pytest.raises(LowbitError, match="same grid"):
        Recipe((AWQ(WeightQuant(bits=4, group_size=32)), GPTQ(q4k)))
    with pytest.raises(LowbitError, match="static groups"):
        Recipe((GPTQ(q4k, act_order=True, static_groups=False),))
    with pytest.raises(LowbitError, match="only GGUF holds"):
        resolve_recipe("gptq-q4_k").check_export("compressed-tensors")
    # a K-quant output exported to a format that cannot hold it: one line, exit 2, nothing written
    model = lowbit.quantize(k_llama(), resolve_recipe("q4_k"), calibration(n=2, length=16), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    for fmt in ("compressed-tensors", "gptq"):
        capsys.readouterr()
        code = main(["export", str(tmp_path / "q"), "--format", fmt, "--out", str(tmp_path / fmt)])
        err = capsys.readouterr().err
        assert code == 2 and "Q4_K grid" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / fmt).exists()


def test_mixes_choose_types_as_llama_quantize_does():
    n = 30  # SmolLM2-135M's layers
    def types(mix: str, role: str) -> list[str]:
        return [mix_type(mix, LinearPlace(f"x.{role}", i, n)) for i in range(n)]

    more = [i for i in range(n) if i < 3 or i >= 26 or (i - 3) % 3 == 2]  # use_more_bits for 30 layers
    assert [i for i, t in enumerate(types("Q4_K_M", "v_proj")) if t == "Q6_K"] == more
    assert set(types("Q4_K_M", "down_proj")) == {"Q4_K", "Q6_K"} and set(types("Q4_K_M", "q_proj")) == {"Q4_K"}
    assert types("Q4_K_S", "v_proj")[:5] == ["Q5_K"] * 4 + ["Q4_K"]
    assert types("Q3_K_M", "v_proj")[:3] == ["Q5_K", "Q5_K", "Q4_K"] and set(types("Q3_K_M", "o_proj")) == {"Q4_K"}
    assert types("Q3_K_M", "down_proj")[:2] == ["Q5_K", "Q4_K"]  # the first 1/16 of 30 layers is layer 0
    assert set(types("Q3_K_L", "down_proj")) == {"Q5_K"} and set(types("Q3_K_S", "up_proj")) == {"Q3_K"}
    # Phi-3's fused Linears: llama.cpp types attn_qkv as attn_v, and gate/up (ffn_up) as the base
    assert types("Q4_K_M", "qkv_proj") == types("Q4_K_M", "v_proj") and set(types("Q4_K_M", "gate_up_proj")) == {"Q4_K"}


def test_q2_k_mixes_choose_types_as_llama_quantize_does():
    n = 16
    def types(mix: str, role: str, n_gqa: int) -> list[str]:
        return [mix_type(mix, LinearPlace(f"x.{role}", i, n, n_gqa)) for i in range(n)]

    # llama-quantize's Q2_K: attn_v Q3_K, or Q4_K where 4+ query heads share a kv head; ffn_down, attn_output Q3_K
    assert set(types("Q2_K_M", "v_proj", 3)) == {"Q3_K"} and set(types("Q2_K_M", "v_proj", 4)) == {"Q4_K"}
    assert set(types("Q2_K_M", "down_proj", 1)) == set(types("Q2_K_M", "o_proj", 8)) == {"Q3_K"}
    assert set(types("Q2_K_M", "q_proj", 8)) == set(types("Q2_K_M", "gate_proj", 8)) == {"Q2_K"}
    # Q2_K_S: attn_v Q4_K only from 4 query heads per kv head, ffn_down Q4_K in the first eighth, the rest Q2_K
    assert set(types("Q2_K_S", "v_proj", 3)) == {"Q2_K"} and set(types("Q2_K_S", "v_proj", 4)) == {"Q4_K"}
    assert types("Q2_K_S", "down_proj", 4) == ["Q4_K"] * 2 + ["Q2_K"] * 14
    assert set(types("Q2_K_S", "o_proj", 8)) == set(types("Q2_K_S", "up_proj", 8)) == {"Q2_K"}
    assert LLAMA_FTYPES.get("Q2_K_M") == "Q2_K" and resolve_recipe("gptq-q2_k_m").weight_step.grid.ggml == "Q2_K_M"
    # as llama-quantize, Q2_K_S only with the inputs' importance (rounded blind, SmolLM2 went from 18.9 to 82.3)
    assert resolve_recipe("imatrix-q2_k_s").needs_calibration and resolve_recipe("gptq-q2_k_s").needs_calibration
    with pytest.raises(LowbitError, match="Q2_K_S rounded to nearest without the inputs' importance"):
        resolve_recipe("q2_k_s")


@pytest.mark.parametrize("kv_heads, attn_v", [(1, "Q4_K"), (2, "Q3_K")])
def test_q2_k_m_model_exports_each_tensor_on_its_mix_type(tmp_path, monkeypatch, kv_heads, attn_v):
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    model = lowbit.quantize(k_llama(2, kv_heads), resolve_recipe("q2_k_m"), calibration(n=2, length=16), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    write_gguf(tmp_path / "q", loaded, tmp_path / "m.gguf")
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for i in range(2):  # 4 query heads over kv_heads: n_gqa 4 gives attn_v Q4_K, n_gqa 2 Q3_K
        assert stored[f"blk.{i}.attn_v.weight"] == attn_v
        assert stored[f"blk.{i}.ffn_down.weight"] == stored[f"blk.{i}.attn_output.weight"] == "Q3_K"
        assert stored[f"blk.{i}.attn_q.weight"] == stored[f"blk.{i}.ffn_gate.weight"] == "Q2_K"
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")


def test_q4_k_m_model_exports_each_tensor_on_its_mix_type(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    layers = 8
    model = lowbit.quantize(k_llama(layers), resolve_recipe("gptq-q4_k_m"), calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    write_gguf(tmp_path / "q", loaded, tmp_path / "m.gguf")
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    more = [i for i in range(layers) if i < 1 or i >= 7 or (i - 1) % 3 == 2]  # [0, 3, 6, 7]
    for i in range(layers):
        expected = "Q6_K" if i in more else "Q4_K"
        assert stored[f"blk.{i}.attn_v.weight"] == expected and stored[f"blk.{i}.ffn_down.weight"] == expected
        assert stored[f"blk.{i}.attn_q.weight"] == stored[f"blk.{i}.ffn_up.weight"] == "Q4_K"
    assert stored["token_embd.weight"] == "Q4_K" and stored["output.weight"] == "Q6_K"  # llama-quantize's, untied
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")


@pytest.mark.parametrize("hidden, tied, embd, output", [
    (256, False, "Q4_K", "Q6_K"),  # the mix's base type for the lookup table, Q6_K for the head
    (256, True, "Q6_K", None),  # one table, quantized as the head (llama.cpp: has_tied_embeddings)
    (64, False, "Q5_0", "Q8_0"),  # widths that hold no super-block: Q4_K's fallback, and the head's Q8_0
    (64, True, "Q8_0", None),
])
def test_mix_tables_get_llama_quantizes_types(tmp_path, monkeypatch, hidden, tied, embd, output):
    """The embedding and head of a K mix recipe are on the types llama-quantize gives token_embd and output; the
    saved model gives the in-memory logits, and the GGUF blocks hold lowbit's table bit for bit."""
    monkeypatch.setenv("LOWBIT_GGUF_DTYPE", "float32")
    model = lowbit.quantize(k_llama(1, hidden=hidden, tied=tied), resolve_recipe("imatrix-q4_k_m"),
                            calibration(n=2, length=16), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    loaded = lowbit.load(tmp_path / "q")
    ids = calibration(n=2, length=16, seed=5)
    with torch.no_grad():
        exact = model(ids).logits
        assert torch.equal(loaded(ids).logits, exact)
        # evaluation's backend: the same logits; the fast one (int kernels where a grid fits one) close to them
        assert torch.equal(lowbit.load(tmp_path / "q", backend="dequantized")(ids).logits, exact)
        fast = lowbit.load(tmp_path / "q", backend="fast")(ids).logits
        assert (fast - exact).abs().max() <= 0.05 * exact.abs().max()
    write_gguf(tmp_path / "q", loaded, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == embd
    assert ("output.weight" in tensors) == (output is not None)
    if output is not None:
        assert tensors["output.weight"].tensor_type.name == output
        head = loaded.lm_head.dequantized_weight()
        assert torch.equal(dequantized_by_gguf(tensors["output.weight"].data, output).reshape(head.shape), head)
    table = loaded.get_input_embeddings().float_table(torch.float32)
    assert torch.equal(dequantized_by_gguf(tensors["token_embd.weight"].data, embd).reshape(table.shape), table)
    assert_gguf_gives_lowbits_logits(loaded, tmp_path / "m.gguf")
