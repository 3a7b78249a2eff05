import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.numerics.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 64, 129])
def test_pack_unpack_round_trip_is_exact(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits * n))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_four_bit_packing_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_three_bits_use_three_bytes_per_eight_codes():
    codes = torch.full((1, 16), 7, dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [[255] * 6]


def test_wrong_packed_width_is_a_clear_error():
    with pytest.raises(LowbitError, match="corrupt"):
        unpack_bits(torch.zeros(2, 5, dtype=torch.uint8), 4, 16)


def test_sparse_linear_stores_pruned_weights_compactly_and_exactly():
    from lowbit.numerics.prune import prune_mask
    from lowbit.runtime.sparse import SparseLinear
    from toy import random_weight

    W = random_weight(32, 64)
    W[prune_mask(W.abs(), None, (2, 4), per_row=True)] = 0.0  # 2:4
    module = SparseLinear.from_dense(W, bias=None)
    assert torch.equal(module.dense_weight(), W) and module.nnz == W.numel() // 2
    stored = sum(b.numel() * b.element_size() for b in module.buffers())
    assert stored == W.numel() // 2 * 4 + W.numel() // 8  # half the float32 values plus one bit per weight
    x = torch.randn(3, 64)
    assert torch.equal(module(x), torch.nn.functional.linear(x, W))
    fast = module.fast_module()  # the dense weight kept, not scattered per call
    assert torch.equal(fast(x), torch.nn.functional.linear(x, W))
    assert set(fast.state_dict()) == {f"exact.{k}" for k in module.state_dict()}  # the dense copy is not saved


@pytest.mark.parametrize("grid", [
    dict(bits=4, symmetric=False, group_size=32), dict(bits=4, symmetric=True, group_size=128),
    dict(bits=8, symmetric=True, granularity="channel"),
])
def test_fast_backend_kernels_match_the_exact_output(grid):
    """PyTorch's int4/int8 CPU kernels on lowbit's packed weights: same product within bfloat16 precision, for
    decode-sized and prefill-sized inputs, and in_features that are not a whole number of groups (padded)."""
    from lowbit.numerics.rtn import rtn
    from lowbit.recipe import WeightQuant
    from lowbit.runtime.weight_only import WeightOnlyLinear
    from toy import random_weight

    W = random_weight(64, 96)  # 96 columns: g128 covers them with one padded group
    module = WeightOnlyLinear.from_qweight(rtn(W, WeightQuant(**grid)), torch.randn(64))
    kernel = module.fast_module()
    assert kernel is not None
    for tokens in (1, 40):
        x = torch.randn(2, tokens, 96)
        exact, fast = module(x), kernel(x)
        assert fast.shape == exact.shape and ((fast - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.parametrize("scheme", ["w8a8-token", "w8a8-static", "llm-int8"])
def test_integer_kernels_match_the_fake_quant_reference(scheme):
    """W8A8 and LLM.int8() on int8 x int8 -> int32 (torch._int_mm): the integer product is exact, so the output
    equals the fake-quant reference up to float32 summation order, with outlier columns (LLM.int8()) in float."""
    from lowbit.numerics.rtn import rtn
    from lowbit.recipe import WeightQuant
    from lowbit.runtime.act_quant import ActQuantLinear
    from lowbit.runtime.llm_int8 import Int8OutlierLinear
    from toy import random_weight

    W = random_weight(48, 96)
    qweight = rtn(W, WeightQuant(8, True, "channel"))
    if scheme == "llm-int8":
        module = Int8OutlierLinear.from_qweight(qweight, torch.randn(48), threshold=6.0)
    else:
        module = ActQuantLinear.from_qweight(qweight, torch.randn(48), act_per_token=scheme == "w8a8-token",
                                             act_static=scheme == "w8a8-static")
        if module.input_scale is not None:
            module.input_scale = torch.tensor(4.0 / 127)
    x = torch.randn(2, 40, 96)
    x[..., 7] *= 30.0  # an outlier channel: LLM.int8() sends it to the float path; static W8A8 clamps it
    exact = module(x)
    kernel = module.fast_module()
    assert kernel is not None
    fast = kernel(x)
    assert torch.allclose(fast, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_load_rejects_an_unknown_backend(tmp_path):
    import lowbit

    with pytest.raises(LowbitError, match="backend 'turbo'"):
        lowbit.load(tmp_path, backend="turbo")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_packing_in_row_slices_gives_the_same_bytes(bits, monkeypatch):
    """Large tables pack a slice of rows at a time (their 64-bit words would take 8 bytes per code at once)."""
    import lowbit.numerics.packing as packing

    codes = torch.randint(0, 2**bits, (3, 37, 45), dtype=torch.uint8)
    whole = packing.pack_bits(codes, bits)
    monkeypatch.setattr(packing, "_SLICE_CODES", 100)  # two rows of 45 codes at a time
    sliced = packing.pack_bits(codes, bits)
    assert torch.equal(sliced, whole)
    assert torch.equal(packing.unpack_bits(sliced, bits, 45), codes)
