"""The fast backend's modules (runtime/fast.py): one per kernel, swapped in at load, their weight layouts buffers
that follow the model (the old plain attributes stayed behind on .to()), nothing of them saved."""

from __future__ import annotations

import copy

import torch

import lowbit
from lowbit.recipe import GPTQ, RTN, ActQuant, Prune, WeightQuant
from lowbit.runtime.fast import DequantizedLinear, Int4KernelLinear, Int8Int8KernelLinear, Int8KernelLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from toy import byte_tokenizer, calibration, toy_model

IDS = calibration(n=2, length=12, seed=4)


def _saved(tmp_path, recipe, name):
    model = lowbit.quantize(toy_model("llama", biases=False), recipe, calibration(), batch_size=4)
    lowbit.save(model, tmp_path / name, tokenizer=byte_tokenizer())
    with torch.no_grad():
        return tmp_path / name, model(IDS).logits


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for +0.0)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_each_grid_gets_its_kernel_module_and_agrees_with_the_exact_model(tmp_path):
    cases = {
        "w4": ((GPTQ(WeightQuant(4, True, "group", 32)),), Int4KernelLinear, 2e-2),
        "w8": ((RTN(WeightQuant(8, True, "channel")),), Int8KernelLinear, 1e-3),
        "w8a8": ((RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")), Int8Int8KernelLinear, 1e-4),
        "pruned": ((Prune("magnitude", 0.5),), DequantizedLinear, 0.0),
    }
    for name, (recipe, kernel, tolerance) in cases.items():
        folder, exact_logits = _saved(tmp_path, recipe, name)
        fast = lowbit.load(folder, backend="fast")
        kernels = [m for m in fast.modules() if isinstance(m, kernel)]
        assert kernels, name
        with torch.no_grad():
            assert relative(fast(IDS).logits, exact_logits) <= tolerance, name
        assert not any(k.startswith(("packed", "scales_and_zeros", "weight_t")) or ".packed" in k
                       for k in fast.state_dict()), name  # the kernels' layouts are never saved


def test_kernel_layouts_follow_the_model_to_another_dtype(tmp_path):
    """A bfloat16 model made from a fast-loaded float32 one: the layouts move with it (buffers) and still compute."""
    folder, exact_logits = _saved(tmp_path, (GPTQ(WeightQuant(4, True, "group", 32)),), "w4")
    fast = lowbit.load(folder, backend="fast")
    kernel = next(m for m in fast.modules() if isinstance(m, Int4KernelLinear))
    assert "packed" in dict(kernel.named_buffers()) and isinstance(kernel.exact, WeightOnlyLinear)
    with torch.no_grad():
        assert relative(fast.to(torch.bfloat16)(IDS).logits.float(), exact_logits) < 5e-2


def test_a_fast_loaded_model_saves_its_stored_form(tmp_path):
    """lowbit.save of a fast-loaded model writes the packed modules, not the kernel wrappers: it loads back."""
    folder, exact_logits = _saved(tmp_path, (GPTQ(WeightQuant(4, True, "group", 32)),), "w4")
    fast = lowbit.load(folder, backend="fast")
    lowbit.save(fast, tmp_path / "again", tokenizer=byte_tokenizer())
    assert any(isinstance(m, Int4KernelLinear) for m in fast.modules())  # the fast modules are back afterwards
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "again")(IDS).logits, exact_logits)


def test_the_dequantized_backend_gives_the_exact_logits_bit_for_bit(tmp_path):
    """Evaluation's backend: every runtime Linear (weight-only symmetric/asymmetric/act-order, static, dynamic and
    asymmetric W8A8, LLM.int8(), FP8 and NVFP4 inputs, QuaRot, pruned, pruned and quantized) keeps its float weight instead of dequantizing it per call; the
    logits are torch.equal to the exact backend's, in float32 and bfloat16, and what it saves is the stored form."""
    from lowbit.presets import resolve_recipe
    from lowbit.recipe import LLMInt8, SparseGPT

    grid4 = WeightQuant(4, False, "group", 32)
    cases = {
        "w4-asym": (RTN(grid4),),
        "w4-actorder": (GPTQ(WeightQuant(4, True, "group", 32), act_order=True, static_groups=False),),  # g_idx
        "w8a8-static": (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "tensor", dynamic=False)),
        "w8a8-token": (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")),
        "w8a8-asym": (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token", symmetric=False)),
        "llm-int8": (LLMInt8(threshold=0.5),),
        "fp8-static": resolve_recipe("fp8"),
        "nvfp4": resolve_recipe("nvfp4"),
        "quarot-w4a8": resolve_recipe("quarot-w4a8"),  # the online rotation around a W4A8 down_proj
        "wanda": (Prune("wanda", 0.5),),
        "sparsegpt-w4": (SparseGPT(0.5, weights=grid4),),
    }
    for name, recipe in cases.items():
        folder, _ = _saved(tmp_path, recipe, name)
        for dtype in (torch.float32, torch.bfloat16):
            exact = lowbit.load(folder, dtype=dtype)
            fast = lowbit.load(folder, dtype=dtype, backend="dequantized")
            swapped = [m for m in fast.modules() if isinstance(m, DequantizedLinear)]
            assert swapped and all(m.weight.dtype == dtype for m in swapped), name
            with torch.no_grad():
                assert same_bits(fast(IDS).logits, exact(IDS).logits), (name, dtype)
    lowbit.save(fast, tmp_path / "again", tokenizer=byte_tokenizer())
    assert lowbit.load(tmp_path / "again").state_dict().keys() == exact.state_dict().keys()  # no float weight saved


def test_linears_reading_one_input_quantize_it_once(tmp_path, monkeypatch):
    """On the dequantized backend q/k/v (and gate/up) share one quantized input: 4 quantizations per Llama block,
    not 7, with the exact backend's logits."""
    from lowbit.runtime.act_quant import ActQuantLinear

    folder, exact_logits = _saved(tmp_path, (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")), "w8a8")
    fast = lowbit.load(folder, backend="dequantized")
    calls = []
    quantize_input = ActQuantLinear.quantize_input
    monkeypatch.setattr(ActQuantLinear, "quantize_input", lambda self, x: calls.append(1) or quantize_input(self, x))
    with torch.no_grad():
        assert same_bits(fast(IDS).logits, exact_logits)
    assert len(calls) == 4 * fast.config.num_hidden_layers
    shared = next(m.shared for m in fast.modules() if isinstance(m, DequantizedLinear))
    assert shared.last is None  # dropped when the forward returned
    copied = copy.deepcopy(fast)  # nothing of the cache is copied
    with torch.no_grad():
        assert same_bits(copied(IDS).logits, exact_logits)


def test_a_shared_quantized_input_is_served_only_for_the_same_unchanged_tensor_and_grid():
    from torch import nn

    from lowbit.runtime.fast import LastQuantizedInput

    class Scaling(nn.Module):  # stands in for a runtime Linear: matmul_input multiplies by its factor
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor, self.calls = factor, 0

        def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * self.factor

    shared, two, three = LastQuantizedInput(), Scaling(2.0), Scaling(3.0)
    x = torch.ones(4)
    assert torch.equal(shared.quantized(x, ("grid", 2), two), 2 * x)
    assert torch.equal(shared.quantized(x, ("grid", 2), two), 2 * x) and two.calls == 1  # served
    assert torch.equal(shared.quantized(x, ("grid", 3), three), 3 * x) and three.calls == 1  # another grid
    x.add_(1.0)  # changed in place: its version counter moved
    assert torch.equal(shared.quantized(x, ("grid", 3), three), 3 * x) and three.calls == 2
    assert torch.equal(shared.quantized(x.clone(), ("grid", 3), three), 3 * x) and three.calls == 3  # another tensor
    with torch.inference_mode():  # inference tensors have no version counter: never served
        y = torch.ones(4)
        shared.quantized(y, ("grid", 2), two)
        shared.quantized(y, ("grid", 2), two)
    assert two.calls == 3
    z = torch.ones(4, requires_grad=True)
    with torch.no_grad():
        shared.quantized(z, ("grid", 2), two)
    assert shared.quantized(z, ("grid", 2), two).requires_grad and two.calls == 5  # no graph was recorded before


def test_input_quantizing_models_stay_differentiable(tmp_path):
    """Attribution through a loaded model (gradients to the input embeddings): the buffered LLM.int8() input and
    the buffered online rotation fall back to graph-recording ops where autograd records."""
    from lowbit.presets import resolve_recipe
    from lowbit.recipe import LLMInt8

    for name, recipe in {"llm-int8": (LLMInt8(threshold=0.5),), "quarot": resolve_recipe("quarot-w4a8")}.items():
        folder, _ = _saved(tmp_path, recipe, name)
        model = lowbit.load(folder, backend="dequantized")
        embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.sum().backward()
        assert embeds.grad is not None and embeds.grad.abs().sum() > 0, name
