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
