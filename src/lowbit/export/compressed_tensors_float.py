"""compressed-tensors' float schemes for lowbit's float grids (FloatQuantLinear), as llm-compressor writes them:

    lowbit grid                 format                  tensors (compressed-tensors names)
    FP8 (tensor/channel/group)  float-quantized         weight float8_e4m3fn [out, in], weight_scale [out or 1, groups]
    NVFP4                       nvfp4-pack-quantized    weight_packed uint8 [out, in / 2], weight_scale float8_e4m3fn
                                                        [out, in / 16], weight_global_scale float32 [1]
    MXFP4                       mxfp4-pack-quantized    weight_packed uint8 [out, in / 2], weight_scale uint8 E8M0
                                                        [out, in / 32]
and, where the Linear quantizes its inputs: FP8 per token (dynamic) or per tensor (``input_scale`` float32 [1]),
NVFP4 per 16 features ("local" dynamic scales under ``input_global_scale`` float32 [1]), MXFP4 per 32 (dynamic).
The scheme arguments are compressed-tensors' own presets (FP8, FP8_DYNAMIC, NVFP4A16, NVFP4, MXFP4A16, MXFP4).
The codes and scales are lowbit's, unchanged: E2M1 codes are packed with compressed-tensors' ``pack_fp4_to_uint8``
so the nibble layout is the reader's by construction; every reader's step (scale, scale / global, 2**(e - 127))
is the one lowbit computed with.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.float_formats import FLOAT_TYPES, element_values
from lowbit.runtime.float_linear import FloatQuantLinear

FLOAT_FORMATS = {"FP8": "float-quantized", "NVFP4": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized"}
# FP8's steps are written in float32 whatever the model's dtype (vLLM holds weight_scale in float32: it reads the
# steps lowbit rounded with); compressed-tensors' FP8 presets declare no scale_dtype, and neither does lowbit
_SCALE_DTYPE_NAMES = {"e4m3": "torch.float8_e4m3fn", "e8m0": "torch.uint8"}


def _pack_fp4():
    try:
        from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    except ImportError:
        raise LowbitError("compressed-tensors export needs the `compressed-tensors` package: pip install 'lowbit[export]'") from None
    return pack_fp4_to_uint8


def _arguments(kind: str, strategy: str, group_size: int | None, dynamic: bool | str) -> dict[str, Any]:
    ft = FLOAT_TYPES[kind]
    args: dict[str, Any] = {"num_bits": ft.bits, "type": "float", "symmetric": True, "group_size": group_size,
                            "strategy": strategy, "dynamic": dynamic, "actorder": None}
    if ft.scale_storage in _SCALE_DTYPE_NAMES:
        args["scale_dtype"] = _SCALE_DTYPE_NAMES[ft.scale_storage]
    return args


def float_scheme(module: FloatQuantLinear) -> dict[str, Any]:
    """The compressed-tensors config group (without targets) of one float Linear."""
    kind = module.float_type
    if FLOAT_TYPES[kind].block:
        strategy = "tensor_group" if kind == "NVFP4" else "group"
        weights = _arguments(kind, strategy, module.group_size, False)
    elif module.per_tensor:
        weights = _arguments(kind, "tensor", None, False)
    elif module.fscale.shape[1] > 1:
        raise LowbitError("FP8 weights with a scale per group of columns are not exported to compressed-tensors: "
                          "vLLM's FP8 kernels read one scale per tensor or per channel; quantize FP8 per channel "
                          "(fp8-dynamic) or per tensor (fp8)")
    else:
        weights = _arguments(kind, "channel", None, False)
    inputs = None
    if module.input_type == "FP8":
        inputs = _arguments("FP8", "token" if module.input_per_token else "tensor", None, not module.input_static)
    elif module.input_type:
        inputs = _arguments(module.input_type, weights["strategy"], FLOAT_TYPES[module.input_type].block,
                            "local" if module.input_type == "NVFP4" else True)
    return {"weights": weights, "input_activations": inputs, "output_activations": None, "format": FLOAT_FORMATS[kind]}


def float_module_tensors(module: FloatQuantLinear) -> dict[str, torch.Tensor]:
    """One float Linear's compressed-tensors tensors (local names)."""
    qweight = module.unpacked()
    ft = qweight.ftype
    if ft.bits == 8:
        steps = qweight.steps()  # float32 [out or 1, n_groups]
        tensors = {"weight": qweight.codes.view(torch.float8_e4m3fn), "weight_scale": steps.reshape(1) if module.per_tensor else steps}
    else:
        tensors = {"weight_packed": _pack_fp4()(element_values(qweight.codes, ft)), "weight_scale": qweight.scale}
        if qweight.global_ is not None:
            tensors["weight_global_scale"] = qweight.global_.float()
    if module.input_scale is not None:
        tensors["input_scale"] = module.input_scale.reshape(1).float()
    if module.input_global is not None:
        tensors["input_global_scale"] = module.input_global.float()
    return tensors
