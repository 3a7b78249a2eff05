"""Every scale fold is proven on the block's own outputs (DESIGN principle 4), and no model type is silently taken
for Llama (principle 3): correct folds keep the float32 model's logits on every architecture, a wrong fold is
refused and reported while the output model stays right, and a structure lowbit cannot handle ends in one line."""

import json

import pytest
import torch

import lowbit
import lowbit.models.arch as arch
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.pipeline.capture import capture_block_calls, run_block
from lowbit.pipeline.context import BlockContext, resolve_groups, select_targets
from lowbit.pipeline.fold import FOLD_TOLERANCE, fold_scales, probe_from, prove_fold, relative_change, snapshot
from lowbit.pipeline.loop import InMemoryStore
from lowbit.pipeline.report import QuantizeReport
from lowbit.pipeline.taps import BlockData
from lowbit.recipe import AWQ, RTN, ActQuant, SmoothQuant, WeightQuant
from toy import ARCHITECTURES, DISCOVERED, UNSUPPORTED, byte_tokenizer, calibration, toy_model, write_corpus

W8 = WeightQuant(8, True, "channel")
W4 = WeightQuant(4, False, "group", 32)
SMOOTHQUANT_W8A8 = (SmoothQuant(0.5), RTN(W8), ActQuant(8, "token"))
AWQ_W4 = (AWQ(W4, n_grid=5, replay_sequences=4, clip_tokens=64),)
TEST_IDS = calibration(n=4, length=40, seed=1)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TEST_IDS).logits


def top1_agreement(model: torch.nn.Module, reference: torch.Tensor) -> float:
    return (logits(model).argmax(-1) == reference.argmax(-1)).float().mean().item()


def wide_scales(width: int, generator: torch.Generator) -> torch.Tensor:
    """Scales spanning 1e-2..1e2, the range SmoothQuant gives outlier channels: a fold's mistakes show plainly."""
    return torch.exp(torch.randn(width, generator=generator) * 1.5).clamp(1e-2, 1e2)


@pytest.mark.parametrize("model_type", ARCHITECTURES + DISCOVERED)
def test_every_correct_fold_is_proven_and_keeps_the_logits(model_type):
    """Fold wide scales into every group of every block, each through the proof: every fold must be accepted,
    and the whole model's float32 logits stay the same (biases and norm weights of the toys are non-zero)."""
    model = toy_model(model_type)
    reference = logits(model)
    store = InMemoryStore(model)
    calls = capture_block_calls(model, store.blocks, calibration(n=4), 2, "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden, folded = calls.hidden, 0
    for i, block in enumerate(store.blocks):
        data = BlockData(hidden, calls.calls[i])
        ctx = BlockContext(f"b{i}", block, data, store.arch, model_type, select_targets(block, "", ()))
        for g in resolve_groups(ctx, norms_only=False):
            if g.blocker:
                assert model_type == "olmo" and "no weight" in g.blocker  # olmo's norms are parameter-free
                continue
            s = wide_scales(g.linears[0].in_features, generator)
            proof = prove_fold(block, probe_from(data), lambda: fold_scales(g.prev, g.linears, s, store.arch.norm_offset),
                               snapshot([g.prev, *g.linears]))
            assert proof.holds, (model_type, i, g.spec.prev, proof.change)
            folded += 1
        with torch.no_grad():
            hidden = [run_block(block, h, c) for h, c in zip(hidden, calls.calls[i])]
    if model_type in ("olmo", "olmo2"):  # norms without weights / norms after the Linears: nothing to fold into
        assert folded == 0
    else:
        assert folded >= len(store.blocks)
    assert relative_change(logits(model), reference) < FOLD_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_refused_fold_leaves_the_block_bit_for_bit_as_it_was(dtype):
    model = toy_model("llama").to(dtype)
    store = InMemoryStore(model)
    calls = capture_block_calls(model, store.blocks, calibration(n=4), 2, "cpu")
    block = store.blocks[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    q = block.self_attn.q_proj
    s = wide_scales(q.in_features, torch.Generator().manual_seed(0))
    # half a fold: q_proj's columns scaled, the norm before it left alone
    proof = prove_fold(block, probe_from(BlockData(calls.hidden, calls.calls[0])),
                       lambda: q.weight.mul_(s.to(q.weight.dtype)), snapshot([q]))
    assert not proof.holds and proof.change > 100 * FOLD_TOLERANCE
    after = block.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("recipe", [SMOOTHQUANT_W8A8, AWQ_W4], ids=["smoothquant", "awq"])
def test_a_wrong_fold_is_refused_and_reported_and_the_model_stays_right(recipe, monkeypatch, caplog):
    """Gemma's norms compute (1 + w) x; given Llama's table entry (plain w x) its norm folds would put the scales
    in the wrong place (the old silent fallback: 27-37% top-1 agreement, exit 0). The proof refuses exactly those
    folds; the Linear -> Linear fold, right under either entry, is kept."""
    monkeypatch.setitem(arch.ARCHITECTURES, "gemma", arch.ARCHITECTURES["llama"])
    reference = logits(toy_model("gemma"))
    model = lowbit.quantize(toy_model("gemma"), recipe, calibration(), batch_size=4)
    folds = [f for b in model.lowbit_info.report.blocks for f in b.folds]
    refused = {f.prev for f in folds if not f.applied}
    assert refused == {"input_layernorm", "post_attention_layernorm"}
    assert all(f.applied for f in folds if f.prev == "mlp.up_proj")
    assert all("changed the block's float32 output" in f.reason and f.change > FOLD_TOLERANCE
               for f in folds if not f.applied)
    assert top1_agreement(model, reference) >= 0.95  # 1.0 here; 0.82 for SmoothQuant with every fold kept
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "did not fold" in r.getMessage()]
    assert len(warnings) == 2 and all("2 of 2 blocks" in w for w in warnings)  # once per group, not per block


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2"])
def test_smoothquant_w8a8_agrees_with_the_float_model(model_type):
    reference = logits(toy_model(model_type))
    model = lowbit.quantize(toy_model(model_type), SMOOTHQUANT_W8A8, calibration(), batch_size=4)
    folds = [f for b in model.lowbit_info.report.blocks for f in b.folds]
    assert folds and all(f.applied for f in folds)
    assert top1_agreement(model, reference) >= 0.9


def test_a_bfloat16_block_is_proven_in_float32():
    """Folding rounds a bfloat16 weight; the proof widens the block to float32, so correct folds still pass."""
    model = lowbit.quantize(toy_model("llama").to(torch.bfloat16), SMOOTHQUANT_W8A8, calibration(), batch_size=4)
    folds = [f for b in model.lowbit_info.report.blocks for f in b.folds]
    assert folds and all(f.applied for f in folds)
    assert all(p.dtype == torch.bfloat16 for p in model.model.layers[0].input_layernorm.parameters())


@pytest.mark.parametrize("recipe", [SMOOTHQUANT_W8A8, AWQ_W4, (RTN(W4),)], ids=["smoothquant", "awq", "rtn"])
def test_olmo_parameter_free_norms_refuse_their_folds_and_quantize(recipe):
    """Olmo has Llama's modules but norms without weights: nothing can absorb their scales (this was an
    AttributeError traceback), so those folds are refused with the reason and the rest of the recipe runs."""
    reference = logits(toy_model("olmo"))
    model = lowbit.quantize(toy_model("olmo"), recipe, calibration(), batch_size=4)
    refused = {f.prev: f.reason for b in model.lowbit_info.report.blocks for f in b.folds if not f.applied}
    if recipe[0].kind == "rtn":
        assert refused == {}
    else:
        assert set(refused) == {"input_layernorm", "post_attention_layernorm"}
        assert all("OlmoLayerNorm has no weight" in reason for reason in refused.values())
    assert top1_agreement(model, reference) >= 0.9


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_a_structure_that_cannot_be_discovered_is_refused_in_one_line(model_type, tmp_path, capsys):
    with pytest.raises(LowbitError, match=f"model type '{model_type}' is not in lowbit's architecture table and its"):
        lowbit.quantize(toy_model(model_type), (RTN(W4),), calibration(), batch_size=4)
    folder = tmp_path / model_type
    toy_model(model_type).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    corpus = write_corpus(tmp_path / "corpus.txt")
    capsys.readouterr()  # transformers' progress bars while saving
    code = main(["--quiet", "quantize", "--model", str(folder), "--recipe", "smoothquant-w8a8", "--out",
                 str(tmp_path / "q"), "--calib", str(corpus), "--nsamples", "4", "--seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lowbit: error: ") and "supported:" in err[0]
    assert not (tmp_path / "q").exists()


def test_a_llama_shaped_unlisted_type_quantizes_saves_and_loads(tmp_path, capsys):
    """Granite is not in the table but has Llama's modules: it is quantized with every fold proven, and its output
    (whose Linears are lowbit's runtime modules by then) is still recognised when saved and loaded."""
    model = lowbit.quantize(toy_model("granite"), SMOOTHQUANT_W8A8, calibration(), batch_size=4)
    lowbit.save(model, tmp_path / "api", tokenizer=byte_tokenizer())
    assert torch.equal(logits(lowbit.load(tmp_path / "api")), logits(model))
    folder = tmp_path / "granite"
    toy_model("granite").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    corpus = write_corpus(tmp_path / "corpus.txt")
    code = main(["--quiet", "quantize", "--model", str(folder), "--recipe", "smoothquant-w8a8", "--out",
                 str(tmp_path / "q"), "--calib", str(corpus), "--nsamples", "4", "--seq-len", "32"])
    assert code == 0, capsys.readouterr().err
    report = QuantizeReport.from_dict(json.loads((tmp_path / "q" / "quant_report.json").read_text()))
    assert report.blocks[0].folds and all(f.applied for b in report.blocks for f in b.folds)
    assert top1_agreement(lowbit.load(tmp_path / "q"), logits(toy_model("granite"))) >= 0.9


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gpt2"])
def test_discovery_finds_what_the_table_says(model_type):
    """Traced, not listed: the structure discovered for a listed type equals its hand-written entry (its norm ->
    Linears groups, stages, norm offset; the table's Linear -> Linear groups cannot be seen by tracing modules)."""
    from lowbit.models.discover import discover

    model = toy_model(model_type)
    table = arch.ARCHITECTURES[model_type]
    found = discover(model, model.config)
    norm_groups = [(g.prev, g.linears) for g in table.groups if "norm" in g.prev or g.prev.startswith("ln_")]
    assert [(g.prev, g.linears) for g in found.groups] == norm_groups
    assert found.sequential == table.sequential and found.norm_offset == table.norm_offset
    assert (found.blocks, found.conv1d) == (table.blocks, table.conv1d)
