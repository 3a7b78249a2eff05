"""PyTorch's own low-bit matmul kernels, wrapped for lowbit's packed weights (the "fast" backend), on CPU and CUDA.

bench/kernels.py measured on this project's 2-core CPU (torch 2.13): for a 4096 -> 11008 Linear at one token,
`_weight_int4pack_mm_for_cpu` ran ~10x faster than fp32 F.linear while lowbit's unpack-and-dequantize path ran
~100x slower; at 512 tokens int4pack matched fp32 (0.94x). `_weight_int8pack_mm` beat dequantizing at one token
(0.5x of fp32 against 0.03x) but was ~30x slower than fp32 at 512 tokens, so W8 uses it for short inputs only.
Both compute in reduced precision (int4pack: bfloat16 activations, ~3e-3 relative error), so this backend is
opt-in; the exact backend reproduces the calibration loop's fake-quant output bit for bit.

W8A8 (INT8 per-channel weights, symmetric INT8 inputs) runs on `torch._int_mm`: int8 x int8 -> int32 products,
exact, then the input and weight scales; it differs from the fake-quant reference only by float32 summation order.

On CUDA the same two kernels have CUDA forms: int4 is tinygemm (`_convert_weight_to_int4pack` /
`_weight_int4pack_mm`, sm80+, the layout gpt-fast and torchao use: two codes per byte, the even column in the high
nibble, then tiled by the op itself), with the same scale/zero convention as the CPU kernel; `_int_mm` runs on
cuBLASLt, which needs more than 16 rows (shorter inputs are zero-padded) and k, n multiples of 8. Weight-only W8
has no CUDA kernel in PyTorch and keeps the dequantizing path there. These CUDA forms are tested only where a GPU
is present (tests/test_cuda_kernels.py, bench/cuda_check.sh); no run of this project has had one yet.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowbit.numerics.grid import group_count
from lowbit.numerics.activations import symmetric_activation_codes
from lowbit.numerics.qweight import QWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_INNER_K_TILES = 2
INT8_MAX_TOKENS = 8  # above this, dequantize + F.linear beats _weight_int8pack_mm on CPU (bench/kernels.py)


def int4pack_weights(qweight: QWeight) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(packed weight, scales_and_zeros [groups, out, 2] bf16, padded in_features) for the int4 kernel of the
    weights' device, or None when the grid does not fit it. The kernel computes w = (q - 8) * scale + zero, so
    lowbit's (q - z) * s maps to zero = (8 - z) * s. in_features is padded to whole groups; inputs are padded with
    zeros to match."""
    if not isinstance(qweight, QWeight):  # K and float grids: their codes are not integer grid points
        return None
    if qweight.bits != 4 or qweight.group_size not in INT4_GROUP_SIZES or not qweight.groups_in_order:
        return None
    device = qweight.codes.device.type
    if qweight.scale.shape[0] != qweight.out_features or device not in ("cpu", "cuda"):
        return None
    if device == "cuda" and qweight.out_features % 8:  # tinygemm tiles the output in rows of 8
        return None
    gs = qweight.group_size
    padded = group_count(qweight.in_features, gs) * gs
    codes = F.pad(qweight.codes.to(torch.int32), (0, padded - qweight.in_features), value=8)  # [out, padded]
    scale = qweight.scale.float()  # [out, n_groups]
    zero_code = qweight.zero.float() if qweight.zero is not None else torch.full_like(scale, 8.0)
    scales_and_zeros = torch.stack([scale, (8.0 - zero_code) * scale], dim=-1).transpose(0, 1)  # [n_groups, out, 2]
    try:
        packed = _int4_layout(codes)
    except (RuntimeError, AttributeError, NotImplementedError):  # a build or device without the kernel
        return None
    return packed, scales_and_zeros.contiguous().to(torch.bfloat16), padded


def _int4_layout(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [out, padded] in 0..15 -> the int4 kernel's own layout on codes' device."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()  # [out, padded / 2]
    inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (t * 16) == 0)  # padded is a multiple of 32
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    padded: int) -> torch.Tensor:
    """x [..., in] -> [..., out] through the int4 kernel (bfloat16 inside, x's dtype outside)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [tokens, in]
    rows = F.pad(rows, (0, padded - rows.shape[-1])).contiguous()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu if packed.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
    out = mm(rows, packed, group_size, scales_and_zeros)  # [tokens, out]
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def int8pack_weights(qweight: QWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 weight [out, in], float scales [out]) for W8 symmetric per-channel grids, or None."""
    if not isinstance(qweight, QWeight):  # FP8's bytes are E4M3 codes, not integers
        return None
    if qweight.bits != 8 or not qweight.symmetric or qweight.scale.shape != (qweight.out_features, 1):
        return None
    return (qweight.codes.to(torch.int16) - 128).to(torch.int8), qweight.scale.float().flatten()


def int8pack_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    return torch.ops.aten._weight_int8pack_mm(rows, weight, scales).reshape(*x.shape[:-1], -1).to(x.dtype)


CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt's int8 matmul in torch._int_mm needs more than 16 rows


def int8_int8_weights(qweight: QWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 weight transposed [in, out], float scales [out]) for `torch._int_mm`, or None when the grid does not fit
    (not INT8 symmetric per-channel) or this build has no int8 matmul on the weights' device."""
    weight = int8pack_weights(qweight)
    device = qweight.codes.device
    if weight is None or device.type not in ("cpu", "cuda") or not _int_mm_available(device):
        return None
    if device.type == "cuda" and (qweight.in_features % 8 or qweight.out_features % 8):
        return None
    return weight[0].T.contiguous(), weight[1]


@functools.cache
def _int_mm_available(device: torch.device) -> bool:
    rows = 1 if device.type == "cpu" else CUDA_INT_MM_MIN_ROWS
    try:
        torch._int_mm(torch.zeros(rows, 8, dtype=torch.int8, device=device), torch.zeros(8, 8, dtype=torch.int8, device=device))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def int8_int8_linear(
    x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, per_token: bool,
    static_scale: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., in] quantized to symmetric INT8 (per token, or per tensor), times the INT8 weight in integers."""
    rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
    codes, scale = symmetric_activation_codes(rows, 8, per_token, static_scale)
    tokens = rows.shape[0]
    if rows.is_cuda and tokens < CUDA_INT_MM_MIN_ROWS:  # zero rows: their products are discarded below
        codes = F.pad(codes, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - tokens))
    acc = torch._int_mm(codes.to(torch.int8), weight_t)[:tokens]  # [tokens, out] int32, exact
    out = acc.float() * scale * weight_scale  # scale: [tokens, 1] or scalar; weight_scale: [out]
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)
