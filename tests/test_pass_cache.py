"""The pass cache (pipeline/pass_cache.py) returns exactly what recomputation would, and never a stale output; the
bfloat16 calibration forwards (pipeline/compute.py) keep statistics float32 and quality close to float32's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distributed_worker import quantized_state
from lowbit import GPTQ, WeightQuant, quantize
from lowbit.pipeline.pass_cache import PassCache
from toy import calibration, toy_model

# every kind of pass: true-sequential statistics (GPTQ, SparseGPT, Wanda), a transform with its own passes and
# replays (AWQ, then GPTQ), activation quantization computing itself in the passes (SmoothQuant static),
# LLM.int8()'s outlier shares, an MoE block whose experts are separate Linears, Gemma 3's sandwich norms and
# Phi-3's fused q/k/v and gate/up
CASES = [("llama", r) for r in (
    "gptq-w4g128-actorder", "awq-gptq-w4g128", "smoothquant-all-w8a8-static", "llm-int8", "wanda-50", "sparsegpt-50",
)] + [("qwen2_moe", "gptq-w4g128"), ("gemma3_text", "gptq-w4g128"), ("phi3", "awq-gptq-w4g128")]


@pytest.mark.parametrize(("model_type", "recipe"), CASES)
def test_cached_passes_give_the_uncached_bytes(model_type: str, recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_PASS_CACHE_MIB", "0")
    plain = quantized_state(model_type, recipe)
    monkeypatch.setenv("LOWBIT_PASS_CACHE_MIB", "1024")
    caches: list[PassCache] = []
    made = PassCache.__init__

    def remember(self: PassCache, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        made(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(PassCache, "__init__", remember)
    cached = quantized_state(model_type, recipe)
    if recipe != "llm-int8":  # data-free rounding: its one pass after compression has nothing earlier to reuse
        assert sum(c.hits for c in caches) > 0, "the cache served nothing: this comparison would prove nothing"
    assert plain["state"].keys() == cached["state"].keys()
    for name, tensor in plain["state"].items():
        assert torch.equal(cached["state"][name], tensor), f"{model_type}/{recipe}: {name} differs"
    assert cached["block_errors"] == plain["block_errors"]
    assert cached["linear_errors"] == plain["linear_errors"]


class Block(nn.Module):
    """A residual block without attention: norm -> mix (Linear, GELU, Linear) -> out; any submodule can be swapped."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.mix(self.norm(x))
        return h + self.out(h)


def run(block: Block, cache: PassCache, x: torch.Tensor, batch: int = 0) -> torch.Tensor:
    with cache.forward_of(batch), torch.no_grad():
        return block(x)


class Counted(nn.Linear):
    """A Linear that counts its computations in ``calls`` (not by a hook: a hooked module always runs)."""

    calls: dict[str, int]
    name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[self.name] = self.calls.get(self.name, 0) + 1
        return super().forward(x)


def counted(linear: nn.Linear, name: str, calls: dict[str, int]) -> nn.Linear:
    linear.__class__ = Counted
    linear.name, linear.calls = name, calls  # type: ignore[attr-defined]
    return linear


def counting(block: Block) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            counted(module, name, calls)
    return calls


def test_a_swapped_module_is_recomputed_and_what_it_feeds_too() -> None:
    block = Block()
    calls = counting(block)
    cache = PassCache(block, 1 << 30)
    x = torch.randn(2, 5, 16)
    first = run(block, cache, x)
    assert calls == {"mix.0": 1, "mix.2": 1, "out": 1}
    assert torch.equal(run(block, cache, x), first)
    assert calls == {"mix.0": 1, "mix.2": 1, "out": 1}, "nothing changed: everything is served"
    # swap the last Linear of the MLP: mix.0 is served, mix.2 and everything after it is recomputed
    block.mix[2] = counted(nn.Linear(32, 16), "mix.2", calls)
    with torch.no_grad():
        expected = x + block.mix[2](torch.nn.functional.gelu(block.mix[0](block.norm(x))))
        expected = expected + block.out(expected)
    calls.clear()
    got = run(block, cache, x)
    assert torch.equal(got, expected)
    assert calls == {"mix.2": 1, "out": 1}, calls  # mix.0 (and GELU) served
    # another batch has its own entries
    calls.clear()
    run(block, cache, torch.randn(2, 5, 16), batch=1)
    assert calls == {"mix.0": 1, "mix.2": 1, "out": 1}


def test_hooks_outputs_changed_in_place_and_a_zero_budget_force_recomputation() -> None:
    block = Block()
    calls = counting(block)
    x = torch.randn(2, 5, 16)
    cache = PassCache(block, 1 << 30)
    run(block, cache, x)
    handle = block.out.register_forward_pre_hook(lambda m, a: None)  # an observer must see its module run
    calls.clear()
    run(block, cache, x)
    assert calls == {"out": 1}
    handle.remove()
    first = run(block, PassCache(block, 0), x)
    # a caller that changed a stored output in place (mix's output is mix.2's): those entries are stale
    cache.entries[(0, "mix")].output.mul_(2.0)
    calls.clear()
    assert torch.equal(run(block, cache, x), first)
    assert calls == {"mix.2": 1}, calls  # mix.0 and GELU served, mix.2 recomputed, out's input is the same again
    off = PassCache(block, 0)
    calls.clear()
    run(block, off, x)
    run(block, off, x)
    assert calls == {"mix.0": 2, "mix.2": 2, "out": 2} and not off.entries


def test_the_budget_bounds_what_is_kept() -> None:
    block = Block()
    x = torch.randn(4, 64, 16)
    small = PassCache(block, 4 * 64 * 16 * 4 + 1)  # room for one [4, 64, 16] float32 output
    run(block, small, x)
    assert small.bytes <= small.budget and len(small.entries) == 1


def test_bfloat16_calibration_forwards_keep_float32_statistics_and_quality() -> None:
    ids = calibration(8, 24)
    errors = {}
    for dtype in (None, torch.bfloat16):
        model = toy_model("llama")
        recipe = (GPTQ(WeightQuant(bits=4, group_size=32)),)
        quantize(model, recipe, ids, batch_size=4, compute_dtype=dtype)
        report = model.lowbit_info.report
        errors[dtype] = report.mean_linear_error()
        assert all(b.rel_error < 0.5 for b in report.blocks)
    assert model.lowbit_info.report.calibration["compute_dtype"] == "bfloat16"
    # bfloat16 forwards shift the calibration inputs by ~0.4%; GPTQ's error moves by far less than it is large
    assert abs(errors[torch.bfloat16] - errors[None]) < 0.1 * errors[None], errors


@pytest.mark.parametrize("scheme", ["w8a8-token", "w8a8-static", "llm-int8", "w4"])
def test_calibration_stand_ins_compute_exactly_what_their_modules_compute(scheme: str) -> None:
    """Every runtime module is replaced while its block is calibrated by one that holds its dequantized weight
    (modules that quantize their inputs still quantize them): outputs bit-identical, biases included."""
    from lowbit.numerics.rtn import rtn
    from lowbit.runtime.act_quant import ActQuantLinear
    from lowbit.runtime.llm_int8 import Int8OutlierLinear
    from lowbit.runtime.weight_only import WeightOnlyLinear
    from toy import random_weight

    W, bias = random_weight(48, 96), torch.randn(48)
    if scheme == "w4":
        module = WeightOnlyLinear.from_qweight(rtn(W, WeightQuant(4, False, "group", 32)), bias)
    elif scheme == "llm-int8":
        module = Int8OutlierLinear.from_qweight(rtn(W, WeightQuant(8, True, "channel")), bias, threshold=6.0)
    else:
        module = ActQuantLinear.from_qweight(rtn(W, WeightQuant(8, True, "channel")), bias,
                                             act_per_token=scheme == "w8a8-token", act_static=scheme == "w8a8-static")
        if module.input_scale is not None:
            module.input_scale = torch.tensor(4.0 / 127)
    x = torch.randn(2, 40, 96)
    x[..., 7] *= 30.0  # an outlier channel
    stand_in = module.calibration_stand_in(torch.float32)
    assert stand_in is not module
    assert torch.equal(stand_in(x), module(x))


def test_a_malformed_cache_budget_is_one_line_before_any_work(toy_folder, tmp_path, monkeypatch, capsys) -> None:
    from lowbit.cli.main import main
    from toy import write_corpus

    model, corpus = toy_folder(), write_corpus(tmp_path / "c.txt")
    capsys.readouterr()  # building the toy model (first use in a run) writes progress bars of its own
    monkeypatch.setenv("LOWBIT_PASS_CACHE_MIB", "lots")
    out = tmp_path / "q"
    code = main(["--quiet", "quantize", "--model", str(model), "--recipe", "gptq-w4g128", "--out", str(out),
                 "--calib", str(corpus), "--nsamples", "4", "--seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["lowbit: error: LOWBIT_PASS_CACHE_MIB must be a number of MiB >= 0, got 'lots'; "
                                 "0 turns the cache off"]
    assert not out.exists()
