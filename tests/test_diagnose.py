"""Outlier diagnosis: it finds injected outlier channels, measures how they stretch a per-tensor grid, and changes
nothing in the model."""

import torch

from lowbit.pipeline.diagnose import diagnose_outliers, summarize_input
from lowbit.pipeline.loop import InMemoryStore
from toy import OUTLIER_CHANNELS, calibration, toy_model


def test_diagnosis_finds_the_injected_outlier_channels():
    results, absmax = diagnose_outliers(InMemoryStore(toy_model("llama")), calibration(), batch_size=4)
    first = results[0]  # block 0's q/k/v input: the embeddings after input_layernorm
    assert first.name == "model.layers.0.self_attn.q_proj" and first.shared_with == ["k_proj", "v_proj"]
    assert set(first.top_channels[:3]) == set(OUTLIER_CHANNELS)
    assert torch.equal(absmax[first.name].max(), torch.tensor(first.max_abs))
    plain, _ = diagnose_outliers(InMemoryStore(toy_model("llama", outliers=False)), calibration(), batch_size=4)
    assert plain[0].ratio < first.ratio and plain[0].median_int8_levels > first.median_int8_levels
    assert len(results) == len(plain) == 2 * 4  # per block: q/k/v, o, gate/up, down


def test_diagnosis_leaves_the_model_unchanged():
    model = toy_model("qwen2")
    ids = calibration(n=2, length=40, seed=1)
    with torch.no_grad():
        before = model(ids).logits
        diagnose_outliers(InMemoryStore(model), calibration(), batch_size=4)
        assert torch.equal(model(ids).logits, before)


def test_summary_statistics():
    absmax = torch.tensor([1.0, 1.0, 2.0, 100.0, 1.0])
    row = summarize_input("x", absmax, threshold=6.0)
    assert row.ratio == 100.0 and row.median_int8_levels == 1.27 and row.channels_over_threshold == 1
    assert row.top_channels[0] == 3
