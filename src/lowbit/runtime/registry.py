"""Name <-> class for the runtime modules, so a checkpoint's config can rebuild them on the meta device.

A module's entry in lowbit_config.json is its class name plus its constructor arguments (``module.config()``), so
the constructors' own signatures are the schema an entry is checked against: every argument, its annotated type,
and whether it has a default. The value rules below apply to an argument by name, in whichever class it occurs.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics.float_formats import FLOAT_TYPES
from lowbit.numerics.kquant import K_TYPES, SUPER_BLOCK
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.embedding import KQuantEmbedding, QuantizedEmbedding
from lowbit.runtime.float_linear import FloatQuantLinear
from lowbit.runtime.kquant_linear import KQuantLinear
from lowbit.runtime.llm_int8 import Int8OutlierLinear
from lowbit.runtime.rotated_input import RotatedInput
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from lowbit.schema import Range, check_range, check_value

RUNTIME_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (WeightOnlyLinear, KQuantLinear, FloatQuantLinear, ActQuantLinear, Int8OutlierLinear, SparseLinear, QuantizedEmbedding,
                KQuantEmbedding, RotatedInput)
}
# the names lowbit_config.json records for a quantized input embedding (a lookup table, not a Linear)
EMBEDDING_CLASSES = frozenset(name for name, cls in RUNTIME_MODULES.items() if issubclass(cls, QuantizedEmbedding))
CONFIG_FIX = "the checkpoint's lowbit_config.json is damaged: re-run lowbit quantize"
# constructor arguments that say where a module is built, not what it stores
_PLACEMENT = ("self", "dtype", "device")
_RANGES = {
    "in_features": Range(1), "out_features": Range(1), "group_size": Range(1), "nnz": Range(0),
    "num_embeddings": Range(1), "embedding_dim": Range(1), "embed_scale": Range(0, open_low=True),
    "bits": Range(2, 8), "act_bits": Range(2, 8), "threshold": Range(0, open_low=True), "seed": Range(0),
}


def is_runtime_module(module: nn.Module) -> bool:
    return isinstance(module, tuple(RUNTIME_MODULES.values()))


def module_config(module: nn.Module) -> dict[str, Any]:
    """What lowbit_config.json stores for a quantized module: its class name and constructor arguments."""
    return {"class": type(module).__name__, **module.config()}  # type: ignore[operator]


@functools.cache
def config_fields(cls: type[nn.Module]) -> dict[str, tuple[Any, bool]]:
    """Argument name -> (annotated type, required) of every constructor argument a config stores, collected over
    the lowbit classes the module is built from: a subclass that passes its base's arguments on through ``**kwargs``
    takes the base's too; one without ``**kwargs`` (KQuantLinear) takes only its own."""
    fields: dict[str, tuple[Any, bool]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not klass.__module__.startswith("lowbit."):
            continue
        hints = typing.get_type_hints(init)
        parameters = inspect.signature(init).parameters.values()
        for p in parameters:
            if p.name not in _PLACEMENT and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                fields.setdefault(p.name, (hints[p.name], p.default is p.empty))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return fields


def check_module_config(name: str, config: Any) -> type[nn.Module]:
    """The runtime class of a lowbit_config.json module entry, after checking the entry against that class's
    constructor: known class, no unknown or missing arguments, each of its annotated type and in range."""
    where = f"lowbit_config.json module {name!r}"
    check_value(config, dict[str, Any], where, CONFIG_FIX)
    cls_name = config.get("class")
    if not isinstance(cls_name, str) or cls_name not in RUNTIME_MODULES:
        raise LowbitError(
            f"checkpoint uses runtime module {cls_name!r} for {name!r}, which this lowbit does not know "
            f"({', '.join(RUNTIME_MODULES)}); upgrade lowbit or re-quantize"
        )
    cls = RUNTIME_MODULES[cls_name]
    fields = config_fields(cls)
    arguments = {k: v for k, v in config.items() if k != "class"}
    unknown = sorted(set(arguments) - set(fields))
    if unknown:
        raise LowbitError(f"{where} has keys {unknown} that {cls_name} does not take; {CONFIG_FIX}")
    missing = sorted(k for k, (_, required) in fields.items() if required and k not in arguments)
    if missing:
        raise LowbitError(f"{where} lacks {missing}, which {cls_name} needs; {CONFIG_FIX}")
    for key, value in arguments.items():
        check_value(value, fields[key][0], where, CONFIG_FIX, key)
        if key in _RANGES and value is not None:  # an optional argument (embed_scale) may be null
            check_range(value, _RANGES[key], f"{where}: {key}", CONFIG_FIX)
    if "ggml" in arguments and arguments["ggml"] not in K_TYPES:
        raise LowbitError(f"{where}: ggml {arguments['ggml']!r} is not a K-quant type ({', '.join(K_TYPES)}); {CONFIG_FIX}")
    width = "in_features" if "in_features" in arguments else "embedding_dim"
    if "ggml" in arguments and arguments[width] % SUPER_BLOCK:
        raise LowbitError(f"{where}: {width} of a {arguments['ggml']} weight must be a multiple of {SUPER_BLOCK}; {CONFIG_FIX}")
    _check_float_types(where, arguments)
    if "nnz" in arguments and arguments["nnz"] > arguments["in_features"] * arguments["out_features"]:
        raise LowbitError(f"{where}: nnz {arguments['nnz']} exceeds in_features x out_features; {CONFIG_FIX}")
    return cls


def _check_float_types(where: str, arguments: dict[str, Any]) -> None:
    """A float weight's type and block, and its inputs' type, as FloatQuantLinear can hold them."""
    if "float_type" not in arguments:
        return
    ft = FLOAT_TYPES.get(arguments["float_type"])
    if ft is None:
        raise LowbitError(f"{where}: float_type {arguments['float_type']!r} is not one of {', '.join(FLOAT_TYPES)}; {CONFIG_FIX}")
    if ft.block and (arguments["group_size"] != ft.block or arguments["in_features"] % ft.block):
        raise LowbitError(f"{where}: a {ft.name} weight has groups of {ft.block} columns and a width divisible by "
                          f"them; {CONFIG_FIX}")
    if arguments.get("input_type", "") not in ("", *FLOAT_TYPES):
        raise LowbitError(f"{where}: input_type {arguments['input_type']!r} is not one of {', '.join(FLOAT_TYPES)}; {CONFIG_FIX}")


def build_empty(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A runtime module on the meta device, ready for ``load_state_dict(assign=True)``-style filling. ``config``
    is an entry ``check_module_config`` accepted (``read_lowbit_config`` checks every entry before loading)."""
    arguments = {k: v for k, v in config.items() if k != "class"}
    return RUNTIME_MODULES[config["class"]](dtype=dtype, device="meta", **arguments)
