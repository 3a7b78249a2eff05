"""Name <-> class for the runtime modules, so a checkpoint's config can rebuild them on the meta device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.llm_int8 import Int8OutlierLinear
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear

RUNTIME_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (WeightOnlyLinear, ActQuantLinear, Int8OutlierLinear, SparseLinear)
}


def is_runtime_module(module: nn.Module) -> bool:
    return isinstance(module, tuple(RUNTIME_MODULES.values()))


def module_config(module: nn.Module) -> dict[str, Any]:
    """What lowbit_config.json stores for a quantized module: its class name and constructor arguments."""
    return {"class": type(module).__name__, **module.config()}  # type: ignore[operator]


def build_empty(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A runtime module on the meta device, ready for ``load_state_dict(assign=True)``-style filling."""
    config = dict(config)
    name = config.pop("class", None)
    if name not in RUNTIME_MODULES:
        raise LowbitError(
            f"checkpoint uses runtime module {name!r}, which this lowbit does not know ({', '.join(RUNTIME_MODULES)}); "
            "upgrade lowbit or re-quantize"
        )
    in_features, out_features = config.pop("in_features"), config.pop("out_features")
    return RUNTIME_MODULES[name](in_features, out_features, dtype=dtype, device="meta", **config)
