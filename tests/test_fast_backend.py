"""The fast backend's modules (runtime/fast.py): one per kernel, swapped in at load, their weight layouts buffers
that follow the model (the old plain attributes stayed behind on .to()), nothing of them saved."""

from __future__ import annotations

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
    """Evaluation's backend: every runtime Linear (weight-only symmetric/asymmetric/act-order, static and dynamic
    W8A8, LLM.int8(), pruned, pruned and quantized) keeps its float weight instead of dequantizing it per call; the
    logits are torch.equal to the exact backend's, in float32 and bfloat16, and what it saves is the stored form."""
    from lowbit.recipe import LLMInt8, SparseGPT

    grid4 = WeightQuant(4, False, "group", 32)
    cases = {
        "w4-asym": (RTN(grid4),),
        "w4-actorder": (GPTQ(WeightQuant(4, True, "group", 32), act_order=True, static_groups=False),),  # g_idx
        "w8a8-static": (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "tensor", dynamic=False)),
        "w8a8-token": (RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")),
        "llm-int8": (LLMInt8(threshold=0.5),),
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
                assert torch.equal(fast(IDS).logits, exact(IDS).logits), (name, dtype)
    lowbit.save(fast, tmp_path / "again", tokenizer=byte_tokenizer())
    assert lowbit.load(tmp_path / "again").state_dict().keys() == exact.state_dict().keys()  # no float weight saved
