"""Runtime modules on CUDA (skipped without a GPU; `bench/cuda_check.sh` runs them on a lent one): the fast
backend's CUDA kernels (tinygemm int4, cuBLASLt int8 x int8) against the exact dequantizing path, including the
shapes they refuse, and a whole model loaded on CUDA against the CPU's logits."""

from __future__ import annotations

import pytest
import torch

from lowbit.numerics.rtn import rtn
from lowbit.recipe import WeightQuant
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from toy import random_weight

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INT4_GRIDS = [dict(bits=4, symmetric=False, group_size=32), dict(bits=4, symmetric=True, group_size=128)]


def _w8a8(out_features: int, in_features: int, static: bool = False) -> ActQuantLinear:
    qweight = rtn(random_weight(out_features, in_features), WeightQuant(8, True, "channel"))
    module = ActQuantLinear.from_qweight(qweight, torch.randn(out_features), act_per_token=not static, act_static=static)
    if static:
        module.input_scale = torch.tensor(4.0 / 127)
    return module


def _exact_then_fast(module: WeightOnlyLinear, in_features: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(exact output, fast-kernel output) of one decode-sized (1 token, padded for cuBLASLt) and one prefill-sized
    input: the module, then its fast module (runtime/fast.py)."""
    inputs = [torch.randn(2, tokens, in_features, device="cuda") for tokens in (1, 40)]
    fast = module.fast_module()
    assert fast is not None
    return [(module(x), fast(x)) for x in inputs]


@needs_cuda
def test_cuda_keeps_the_dequantizing_path_where_no_kernel_fits():
    odd_rows = WeightOnlyLinear.from_qweight(rtn(random_weight(60, 128), WeightQuant(4, True, "group", 32)), None)
    assert odd_rows.to("cuda").fast_module() is None  # tinygemm tiles the output in rows of 8
    w8 = WeightOnlyLinear.from_qweight(rtn(random_weight(64, 96), WeightQuant(8, True, "channel")), None)
    assert w8.to("cuda").fast_module() is None  # _weight_int8pack_mm has no CUDA form


@needs_cuda
@pytest.mark.parametrize("grid", INT4_GRIDS)
def test_int4_tinygemm_matches_the_exact_output_on_cuda(grid):
    module = WeightOnlyLinear.from_qweight(rtn(random_weight(64, 576), WeightQuant(**grid)), torch.randn(64)).to("cuda")
    for exact, fast in _exact_then_fast(module, 576):
        assert ((fast - exact).norm() / exact.norm()) < 1e-2


@needs_cuda
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_int_mm_matches_the_fake_quant_reference_on_cuda(static):
    for exact, fast in _exact_then_fast(_w8a8(48, 96, static).to("cuda"), 96):
        assert torch.allclose(fast, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("recipe", ["w4g32", "smoothquant-w8a8", "llm-int8", "wanda-2of4"])
def test_a_model_loaded_on_cuda_gives_the_cpus_logits(tmp_path, recipe):
    """Every runtime module on CUDA: exact backend equal to the CPU's up to float summation order, fast backend
    within the kernels' precision."""
    import lowbit
    from lowbit.presets import resolve_recipe
    from toy import byte_tokenizer, calibration, toy_model

    model = lowbit.quantize(toy_model("llama"), resolve_recipe(recipe), calibration(n=4, length=32), batch_size=2)
    lowbit.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        cpu = lowbit.load(tmp_path / "q")(ids).logits
        exact = lowbit.load(tmp_path / "q", device="cuda")(ids.cuda()).logits.cpu()
        fast = lowbit.load(tmp_path / "q", device="cuda", backend="fast")(ids.cuda()).logits.cpu()
    assert torch.allclose(exact, cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())
    assert ((fast - cpu).norm() / cpu.norm()) < 2e-2
