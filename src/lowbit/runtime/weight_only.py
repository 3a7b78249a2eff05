"""WeightOnlyLinear: packed INT2..INT8 weights with per-tensor / per-channel / per-group float16 scales."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics.grid import group_count
from lowbit.numerics.packing import packed_length
from lowbit.numerics.qweight import QWeight
from lowbit.runtime.kernels import int4pack_weights, int8pack_weights


InputGrid = tuple[object, ...]  # what ``input_grid()`` returns: the input quantization's kind and parameters


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight lives as packed integer codes; forward dequantizes and multiplies.

    Buffers: qweight uint8 [out, packed], scales float16 [out or 1, n_groups], qzeros uint8 (asymmetric only),
    g_idx int32 [in] (act-order only), bias [out] (if any).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        per_tensor: bool = False,
        has_g_idx: bool = False,
        has_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__()
        self._init_codes(in_features, out_features, bits, group_size, symmetric, per_tensor, has_g_idx, device)
        n_groups = group_count(in_features, group_size)
        rows = 1 if per_tensor else out_features
        self.register_buffer("scales", torch.empty(rows, n_groups, dtype=torch.float16, device=device))
        self.qzeros: torch.Tensor | None
        self.g_idx: torch.Tensor | None
        self.register_buffer("qzeros", None if symmetric else torch.empty(rows, packed_length(n_groups, bits), dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device) if has_g_idx else None)
        self._init_bias(has_bias, dtype, device)

    def _init_codes(
        self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool, per_tensor: bool,
        has_g_idx: bool, device: torch.device | str,
    ) -> None:
        """What every packed grid's module has: its shape and grid attributes and the packed codes, qweight uint8
        [out, packed] (the K-quant and float modules, whose scales differ, start from here too)."""
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.per_tensor, self.has_g_idx = per_tensor, has_g_idx
        self.register_buffer("qweight", torch.empty(out_features, packed_length(in_features, bits), dtype=torch.uint8, device=device))

    def _init_bias(self, has_bias: bool, dtype: torch.dtype, device: torch.device | str) -> None:
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.empty(self.out_features, dtype=dtype, device=device) if has_bias else None)

    @classmethod
    def from_qweight(cls, qweight: QWeight, bias: torch.Tensor | None, **extra: Any) -> WeightOnlyLinear:
        module = cls(
            qweight.in_features,
            qweight.out_features,
            qweight.bits,
            qweight.group_size,
            qweight.symmetric,
            per_tensor=qweight.scale.shape[0] == 1 and qweight.out_features > 1,
            has_g_idx=qweight.g_idx is not None,
            has_bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=qweight.codes.device,
            **extra,
        )
        return filled(module, qweight.pack(), bias)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored per module in lowbit_config.json."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "per_tensor": self.per_tensor,
            "has_g_idx": self.has_g_idx,
            "has_bias": self.bias is not None,
        }

    def unpacked(self) -> QWeight:
        tensors = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            tensors["qzeros"] = self.qzeros
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        return QWeight.unpack(tensors, self.bits, self.group_size, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [out, in], bit-identical to the fake-quant weight the block loop evaluated."""
        return self.unpacked().dequantize(dtype)

    def weight_kernel(self) -> nn.Module | None:
        """This module's weights on PyTorch's int4 / int8 kernel where the grid fits one on this device
        (runtime/kernels.py: reduced precision, much faster decoding), else None."""
        return weight_kernel(self, self.unpacked())

    def fast_module(self) -> nn.Module | None:
        """The fast backend's module for this one (runtime/fast.py), or None where no kernel fits."""
        return self.weight_kernel()

    def calibration_stand_in(self, dtype: torch.dtype) -> nn.Module:
        """What the block computes with until it is finished: a plain Linear holding the dequantized weight
        (bit-identical outputs; the later stage passes would otherwise unpack it on every call)."""
        return _linear(self.dequantized_weight(dtype), self.bias, dtype)

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the matmul uses, [out, in] in ``dtype`` (what the dequantized backend computes once)."""
        return self.dequantized_weight(dtype)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """What multiplies the weight: the input itself here; quantized inputs in the W8A8 / LLM.int8() modules."""
        return x

    def input_grid(self) -> InputGrid | None:
        """How ``matmul_input`` quantizes, as a hashable value: two modules with equal values give equal
        ``matmul_input(x)`` for every x, so q/k/v (and gate/up) can share one quantized input. None: the input
        is used as it is. Calibrated scales enter by value (the dequantized backend reads this once, at load)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.matmul_input(x), self.float_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        grid = "per-tensor" if self.per_tensor else f"group_size={self.group_size}"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {grid}, sym={self.symmetric}"


def filled(module: nn.Module, packed: dict[str, torch.Tensor], bias: torch.Tensor | None) -> Any:
    """``module`` (built empty) holding the packed tensors of its weight and a copy of ``bias``."""
    for name, tensor in packed.items():
        setattr(module, name, tensor)
    if bias is not None:
        module.bias = bias.detach().clone()
    return module


def weight_kernel(exact: nn.Module, qweight: QWeight) -> nn.Module | None:
    """``exact`` (a runtime Linear computing with ``qweight``) on PyTorch's int4 or int8 kernel where the grid fits
    one on its device, else None."""
    from lowbit.runtime.fast import Int4KernelLinear, Int8KernelLinear

    int4 = int4pack_weights(qweight)
    if int4 is not None:
        return Int4KernelLinear(exact, *int4)
    on_cpu = qweight.codes.device.type == "cpu"  # _weight_int8pack_mm has no CUDA form
    int8 = int8pack_weights(qweight) if on_cpu else None
    return Int8KernelLinear(exact, *int8) if int8 is not None else None


class InputQuantizingStandIn(nn.Module):
    """A module that quantizes its inputs (W8A8, LLM.int8()) while its block is calibrated: its weight dequantized
    once, not on every call, and its inputs quantized by the module itself, so the outputs are bit-identical."""

    def __init__(self, source: WeightOnlyLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(source.dequantized_weight(dtype), requires_grad=False)  # [out, in]
        object.__setattr__(self, "source", source)  # not a submodule: the block holds only the stand-in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source: WeightOnlyLinear = self.source  # type: ignore[assignment]
        weight = self.weight if x.dtype == self.weight.dtype else source.float_weight(x.dtype)
        return F.linear(source.matmul_input(x), weight, source.bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias.to(dtype)
    return linear
