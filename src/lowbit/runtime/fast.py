"""The fast backend's modules: one per kernel, each with one forward, built from an exact runtime module by its
``fast_module()`` when ``lowbit.load(..., backend="fast")`` swaps them in.

Each holds its kernel's weight layout as buffers (they follow ``.to(dtype)``, unlike the plain attributes they
replace; a layout is built for one device, so a module moved to another device refuses to run, in one line: load
the model on the device it runs on) and keeps the exact module as ``exact`` (its packed weights stay the model's
stored form: ``unpacked()``, ``config()``, exports and ``lowbit.save`` (through ``exact_modules``) read them; the
kernels' layouts are never saved). runtime/kernels.py says what each kernel computes and where it exists.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.kernels import INT8_MAX_TOKENS, int4pack_linear, int8_int8_linear, int8pack_linear
from lowbit.runtime.weight_only import InputGrid, WeightOnlyLinear


def _bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class KernelModule(nn.Module):
    """An exact runtime module (``exact``) plus its weights in a kernel's layout, as buffers that follow ``.to()``
    and stay out of the state dict."""

    def __init__(self, exact: nn.Module, **layout: torch.Tensor) -> None:
        super().__init__()
        self.exact = exact
        for name, tensor in layout.items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_forward_pre_hook(_same_device)


def _same_device(module: nn.Module, args: tuple) -> None:
    layout = next(module.buffers(recurse=False))
    if args and isinstance(args[0], torch.Tensor) and args[0].device != layout.device:
        raise LowbitError(
            f"a fast-backend kernel built on {layout.device} got inputs on {args[0].device}; its weight layout is "
            "device-specific: load the model with device=... (or the exact backend) where it runs"
        )


class Int4KernelLinear(KernelModule):
    """A weight-only W4 group-quantized Linear on PyTorch's int4 tinygemm kernel (CPU or CUDA)."""

    def __init__(self, exact: nn.Module, packed: torch.Tensor, scales_and_zeros: torch.Tensor, padded_in: int) -> None:
        # packed: the kernel's int4 tile layout; scales_and_zeros: bfloat16 [groups, out, 2]
        super().__init__(exact, packed=packed, scales_and_zeros=scales_and_zeros)
        self.padded_in = padded_in  # in_features rounded up to whole groups (the kernel's k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a model.to(dtype) casts float buffers: the kernel takes bfloat16 scales whatever the model's dtype
        scales = self.scales_and_zeros.to(torch.bfloat16)
        out = int4pack_linear(x, self.packed, scales, self.exact.group_size, self.padded_in)
        return _bias(out, self.exact.bias)


class Int8KernelLinear(KernelModule):
    """A weight-only W8 per-channel Linear: decode-sized inputs (at most INT8_MAX_TOKENS tokens) on
    ``_weight_int8pack_mm`` (CPU), larger ones through the exact module (the kernel is slower there)."""

    def __init__(self, exact: nn.Module, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__(exact, weight=weight, scales=scales)  # int8 [out, in], float32 [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > INT8_MAX_TOKENS * self.exact.in_features:
            return self.exact(x)
        return _bias(int8pack_linear(x, self.weight, self.scales.float()), self.exact.bias)


class Int8Int8KernelLinear(KernelModule):
    """W8A8 with symmetric INT8 inputs on int8 x int8 -> int32 (``torch._int_mm``): the integer product is exact,
    then the per-token (or static per-tensor) input scale and the per-channel weight scale."""

    def __init__(self, exact: nn.Module, weight_t: torch.Tensor, weight_scale: torch.Tensor) -> None:
        super().__init__(exact, weight_t=weight_t, weight_scale=weight_scale)  # int8 [in, out], float32 [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        static = self.exact.input_scale if self.exact.act_static else None
        out = int8_int8_linear(x, self.weight_t, self.weight_scale.float(), self.exact.act_per_token, static)
        return _bias(out, self.exact.bias)


class QuantizedInputs(nn.Module):
    """Inputs fake-quantized as the exact module does, then a weight-only kernel (an activation grid with no
    integer kernel: W4A8, asymmetric inputs)."""

    def __init__(self, exact: nn.Module, kernel: nn.Module) -> None:
        super().__init__()
        self.exact = exact
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(self.exact.quantize_input(x))


class Int8OutlierKernelLinear(KernelModule):
    """LLM.int8(): the INT8 columns on ``torch._int_mm``, the outlier columns of this call in float."""

    def __init__(self, exact: nn.Module, weight_t: torch.Tensor, weight_scale: torch.Tensor) -> None:
        super().__init__(exact, weight_t=weight_t, weight_scale=weight_scale)  # int8 [in, out], float32 [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.runtime.llm_int8 import outlier_columns

        outliers = outlier_columns(x, self.exact.threshold)  # [in]
        weight_scale = self.weight_scale.float()
        out = int8_int8_linear(x.masked_fill(outliers, 0.0), self.weight_t, weight_scale, True, None)
        columns = outliers.nonzero().flatten()
        if columns.numel():
            w_outlier = self.weight_t[columns].float().T * weight_scale[:, None]  # [out, n_outliers], dequantized
            out = out + F.linear(x[..., columns], w_outlier.to(x.dtype))
        return _bias(out, self.exact.bias)


class _Quantized(NamedTuple):
    source: weakref.ref  # the input (not kept alive: a dead reference matches nothing, so ids cannot be confused)
    version: int  # its version counter then (every in-place op on it, or on a view of it, moves the counter)
    grid: InputGrid
    grad: bool  # quantized with autograd recording: a result without a graph must not serve a call that needs one
    value: torch.Tensor  # matmul_input(source)


class LastQuantizedInput:
    """The last input a model's Linears quantized, and the result: q, k and v (gate and up) are called one after
    another on the same tensor and quantize it the same way, so the second and third calls reuse the first's.
    Served only for the very same tensor object, unchanged since, on the same input grid and autograd mode.
    Holds one quantized input at a time, dropped when the model's forward returns (``to_dequantized``'s hook)."""

    def __init__(self) -> None:
        self.last: _Quantized | None = None

    def quantized(self, x: torch.Tensor, grid: InputGrid, exact: nn.Module) -> torch.Tensor:
        if x.is_inference():  # no version counter: an in-place change could not be seen
            return exact.matmul_input(x)
        last, grad = self.last, torch.is_grad_enabled()
        # x._version: PyTorch's count of in-place changes to x's memory (what the pass cache keys on too)
        if last is not None and last.source() is x and last.version == x._version and last.grid == grid and last.grad == grad:
            return last.value
        value = exact.matmul_input(x)
        self.last = _Quantized(weakref.ref(x), x._version, grid, grad, value)
        return value

    def clear(self, *_: object) -> None:
        self.last = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickling of a loaded model: a weak reference cannot be copied
        return {}

    def __setstate__(self, state: dict) -> None:
        self.last = None


class DequantizedLinear(KernelModule):
    """A runtime Linear with its float weight computed once: the exact module's own forward (its input quantization
    included) with the weight it would dequantize on every call kept instead, so outputs are bit-identical to the
    exact backend's at float speed, for float memory. The dequantized backend (evaluation) uses it for every
    runtime Linear, the fast backend for pruned ones (no CPU kernel gains from 2:4 sparsity). Linears that quantize
    their inputs share one ``LastQuantizedInput`` per model; their input grid (calibrated scales included) is read
    once here, as the weight is."""

    def __init__(self, exact: nn.Module, weight: torch.Tensor, shared: LastQuantizedInput | None = None) -> None:
        super().__init__(exact, weight=weight)  # [out, in]
        grid = exact.input_grid() if isinstance(exact, WeightOnlyLinear) else None  # a pruned Linear: None
        self.input_grid, self.shared = grid, (shared if grid is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # the exact module dequantizes in the input's dtype: so does it here
            return self.exact(x)
        if self.shared is not None:
            return F.linear(self.shared.quantized(x, self.input_grid, self.exact), self.weight, self.exact.bias)
        return F.linear(self.exact.matmul_input(x), self.weight, self.exact.bias)


@contextmanager
def exact_modules(model: nn.Module) -> Iterator[None]:
    """Inside the context the model holds its exact runtime modules where fast ones were swapped in (what is saved
    is the stored form, never a kernel's layout); the fast ones are put back afterwards."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, (KernelModule, QuantizedInputs))]
    for name, module in swapped:
        model.set_submodule(name, module.exact)
    try:
        yield
    finally:
        for name, module in swapped:
            model.set_submodule(name, module)


def to_dequantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap every runtime Linear of ``model`` for a ``DequantizedLinear`` holding its ``dtype`` weight; returns how
    many."""
    switched, shared = 0, LastQuantizedInput()
    for name, module in list(model.named_modules()):
        make = getattr(module, "float_weight", None)
        if callable(make) and not isinstance(module, KernelModule):
            model.set_submodule(name, DequantizedLinear(module, make(dtype), shared))
            switched += 1
    model.register_forward_hook(shared.clear)  # no quantized input outlives the forward that made it
    return switched


def to_fast(model: nn.Module) -> int:
    """Swap every runtime module of ``model`` that has a kernel on its device for its fast module; returns how many."""
    switched = 0
    for name, module in list(model.named_modules()):
        make = getattr(module, "fast_module", None)
        fast = make() if callable(make) else None
        if fast is not None:
            model.set_submodule(name, fast)
            switched += 1
    return switched
