"""Named recipes for the CLI's ``--recipe NAME`` (a path to a JSON recipe works too)."""

from __future__ import annotations

import re
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.recipe import (
    AWQ,
    GPTQ,
    RTN,
    ActQuant,
    LLMInt8,
    Prune,
    Recipe,
    SmoothQuant,
    SparseGPT,
    WeightQuant,
)

W8_CHANNEL = WeightQuant(bits=8, symmetric=True, granularity="channel")
W8_TENSOR = WeightQuant(bits=8, symmetric=True, granularity="tensor")
W4_G128 = WeightQuant(bits=4, symmetric=False, granularity="group", group_size=128)
W3_G128 = WeightQuant(bits=3, symmetric=False, granularity="group", group_size=128)
PER_TOKEN = ActQuant(bits=8, granularity="token", dynamic=True)
PER_TENSOR_STATIC = ActQuant(bits=8, granularity="tensor", dynamic=False)


def _presets() -> dict[str, tuple[str, tuple]]:
    return {
        "w8": ("RTN INT8 symmetric per-channel weights", (RTN(W8_CHANNEL),)),
        "w4g128": ("RTN INT4 asymmetric g128 weights (the demo default)", (RTN(W4_G128),)),
        "w3g128": ("RTN INT3 asymmetric g128 weights", (RTN(W3_G128),)),
        "gptq-w4g128": ("GPTQ INT4 g128", (GPTQ(W4_G128),)),
        "gptq-w4g128-actorder": ("GPTQ INT4 g128 with act-order", (GPTQ(W4_G128, act_order=True),)),
        "gptq-w3g128": ("GPTQ INT3 g128", (GPTQ(W3_G128),)),
        "awq-w4g128": ("AWQ scale + clip search, INT4 g128", (AWQ(W4_G128),)),
        "awq-w3g128": ("AWQ scale + clip search, INT3 g128", (AWQ(W3_G128),)),
        "awq-gptq-w4g128": ("AWQ scales and clip, then GPTQ rounding, INT4 g128", (AWQ(W4_G128), GPTQ(W4_G128))),
        "w8a8-naive": (
            "INT8 per-tensor weights and per-tensor static INT8 inputs (the naive baseline)",
            (RTN(W8_TENSOR), PER_TENSOR_STATIC),
        ),
        "w8a8-token": ("INT8 per-channel weights, per-token dynamic INT8 inputs", (RTN(W8_CHANNEL), PER_TOKEN)),
        "smoothquant-w8a8": (
            "SmoothQuant a=0.5, INT8 per-channel weights, per-token dynamic INT8 inputs",
            (SmoothQuant(0.5), RTN(W8_CHANNEL), PER_TOKEN),
        ),
        "smoothquant-w8a8-static": (
            "SmoothQuant a=0.5, INT8 per-channel weights, per-tensor static INT8 inputs",
            (SmoothQuant(0.5), RTN(W8_CHANNEL), PER_TENSOR_STATIC),
        ),
        "smoothquant-all-w8a8-static": (
            "SmoothQuant a=0.5 on norm and Linear->Linear inputs (up->down too), INT8 per-channel weights, "
            "per-tensor static INT8 inputs",
            (SmoothQuant(0.5, fold_into_linears=True), RTN(W8_CHANNEL), PER_TENSOR_STATIC),
        ),
        "llm-int8": ("LLM.int8(): outlier input columns (|x|>6) in float, the rest INT8", (LLMInt8(6.0),)),
        "magnitude-50": ("magnitude pruning, 50% unstructured", (Prune("magnitude", 0.5),)),
        "wanda-50": ("Wanda pruning, 50% unstructured", (Prune("wanda", 0.5),)),
        "wanda-2of4": ("Wanda pruning, 2:4 semi-structured", (Prune("wanda", None, "2:4"),)),
        "wanda-2of4-w4g128": ("Wanda 2:4, then RTN INT4 g128", (Prune("wanda", None, "2:4"), RTN(W4_G128))),
        "sparsegpt-50": ("SparseGPT 50% unstructured", (SparseGPT(0.5),)),
        "sparsegpt-2of4": ("SparseGPT 2:4 semi-structured", (SparseGPT(None, "2:4"),)),
    }


def preset_names() -> dict[str, str]:
    """Name -> one-line description of every preset."""
    return {name: description for name, (description, _) in _presets().items()}


def resolve_recipe(name_or_path: str) -> Recipe:
    """A preset name, or the path of a JSON recipe file."""
    presets = _presets()
    if name_or_path in presets:
        return Recipe(steps=presets[name_or_path][1], name=name_or_path)
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        return Recipe.from_file(name_or_path)
    sweep = SWEEP_NAME.fullmatch(name_or_path)
    if sweep is not None:
        method = (sweep["method"] or "rtn") + ("-actorder" if sweep["actorder"] else "")
        if method in SWEEP_METHODS:
            return sweep_recipe(method, int(sweep["bits"]), int(sweep["group"] or 0))
    raise LowbitError(
        f"unknown recipe {name_or_path!r}: pass a preset ({', '.join(presets)}), a weight-only grid point named like "
        "the presets (e.g. gptq-w4g64, awq-w3pc, w2g32, gptq-w4g64-actorder) or the path of a JSON recipe file"
    )


# "gptq-w4g64", "w3pc", "awq-gptq-w4g32", "gptq-w4g128-actorder": any point of the sweep grid by name
SWEEP_NAME = re.compile(r"(?:(?P<method>gptq|awq|awq-gptq)-)?w(?P<bits>[2-8])(?:g(?P<group>[1-9][0-9]*)|pc)(?P<actorder>-actorder)?")


# `lowbit compare --methods M... --bits B... --group-sizes G...`: weight-only methods as (name prefix, suffix, steps)
SWEEP_METHODS = ("rtn", "gptq", "gptq-actorder", "awq", "awq-gptq")


def sweep_recipe(method: str, bits: int, group_size: int) -> Recipe:
    """One point of a quant-curve sweep: ``method`` at ``bits`` with an asymmetric grid of ``group_size`` columns
    (0 = per output channel). Named like the presets (``gptq-w4g128``), so a sweep point equal to a preset is it."""
    if method not in SWEEP_METHODS:
        raise LowbitError(f"unknown sweep method {method!r}; pick from {', '.join(SWEEP_METHODS)}")
    if group_size < 0:
        raise LowbitError(f"group size {group_size} is negative; use 0 for per-channel or e.g. 128")
    grid = WeightQuant(bits=bits, symmetric=False, granularity="group" if group_size else "channel",
                       group_size=group_size or 128)
    steps: dict[str, tuple] = {
        "rtn": (RTN(grid),),
        "gptq": (GPTQ(grid),),
        "gptq-actorder": (GPTQ(grid, act_order=True),),
        "awq": (AWQ(grid),),
        "awq-gptq": (AWQ(grid), GPTQ(grid)),
    }
    head = {"rtn": "", "gptq-actorder": "gptq-"}.get(method, f"{method}-")
    tail = "-actorder" if method == "gptq-actorder" else ""
    return Recipe(steps=steps[method], name=f"{head}w{bits}{f'g{group_size}' if group_size else 'pc'}{tail}")
