"""Named recipes for the CLI's ``--recipe NAME`` (a path to a JSON recipe works too)."""

from __future__ import annotations

import dataclasses

from lowbit.errors import LowbitError
from lowbit.numerics.kquant_mix import K_MIXES
from lowbit.preset_names import (
    FIT_SUFFIXES, FLOAT_SCHEMES, PRESETS, QUAROT_PREFIX, ROTATE_PREFIX, ROTATED_SWEEP_METHODS, SWEEP_METHODS,
    parse_recipe_name, split_rotation,
)
from lowbit.recipe import (
    AWQ,
    AutoRound,
    GPTQ,
    RTN,
    ActQuant,
    LLMInt8,
    Prune,
    Recipe,
    Rotate,
    SmoothQuant,
    SparseGPT,
    WeightQuant,
)

W8_CHANNEL = WeightQuant(bits=8, symmetric=True, granularity="channel")
W8_TENSOR = WeightQuant(bits=8, symmetric=True, granularity="tensor")
W4_G128 = WeightQuant(bits=4, symmetric=False, granularity="group", group_size=128)
W3_G128 = WeightQuant(bits=3, symmetric=False, granularity="group", group_size=128)
E8_G128 = WeightQuant(bits=8, symmetric=False, granularity="group", group_size=128)
E6_G128 = WeightQuant(bits=6, symmetric=False, granularity="group", group_size=128)
W4_SYM_G128 = WeightQuant(bits=4, symmetric=True, granularity="group", group_size=128)
PER_TOKEN = ActQuant(bits=8, granularity="token", dynamic=True)
PER_TOKEN_4 = ActQuant(bits=4, granularity="token", dynamic=True)
# The -actorder presets: act-order visiting with groups kept in column order (GPTQ's default static_groups) and H's
# off-diagonal shrunk by 10%, the best act-order variant on the three real models measured, over three calibration
# seeds each (docs/actorder.md: bench/peers/actorder.py).
ACT_ORDER = {"act_order": True, "shrink": 0.1}
PER_TENSOR_STATIC = ActQuant(bits=8, granularity="tensor", dynamic=False)


def _steps() -> dict[str, tuple]:
    """Name -> steps of every preset (names and descriptions: lowbit/preset_names.py)."""
    steps = {
        "w8": (RTN(W8_CHANNEL),),
        "w4g128": (RTN(W4_G128),),
        "w3g128": (RTN(W3_G128),),
        "gptq-w4g128": (GPTQ(W4_G128),),
        "gptq-w4g128-actorder": (GPTQ(W4_G128, **ACT_ORDER),),
        "gptq-w3g128": (GPTQ(W3_G128),),
        "awq-w4g128": (AWQ(W4_G128),),
        "awq-w3g128": (AWQ(W3_G128),),
        "awq-gptq-w4g128": (AWQ(W4_G128), GPTQ(W4_G128)),
        "w8a8-naive": (RTN(W8_TENSOR), PER_TENSOR_STATIC),
        "w8a8-token": (RTN(W8_CHANNEL), PER_TOKEN),
        "smoothquant-w8a8": (SmoothQuant(0.5), RTN(W8_CHANNEL), PER_TOKEN),
        "smoothquant-w8a8-static": (SmoothQuant(0.5), RTN(W8_CHANNEL), PER_TENSOR_STATIC),
        "smoothquant-all-w8a8-static": (SmoothQuant(0.5, fold_into_linears=True), RTN(W8_CHANNEL), PER_TENSOR_STATIC),
        "llm-int8": (LLMInt8(6.0),),
        "magnitude-50": (Prune("magnitude", 0.5),),
        "wanda-50": (Prune("wanda", 0.5),),
        "wanda-2of4": (Prune("wanda", None, "2:4"),),
        "wanda-2of4-w4g128": (Prune("wanda", None, "2:4"), RTN(W4_G128)),
        "sparsegpt-50": (SparseGPT(0.5),),
        "sparsegpt-2of4": (SparseGPT(None, "2:4"),),
        "w4g128-e8": (RTN(W4_G128),),
        "w4g128-e6": (RTN(W4_G128),),
        "gptq-w4g128-e6": (GPTQ(W4_G128),),
        "w4a8": (RTN(W4_SYM_G128), PER_TOKEN),
        "gptq-w4a8": (GPTQ(W4_SYM_G128), PER_TOKEN),
        "gptq-w4a8-actorder": (GPTQ(W4_SYM_G128, **ACT_ORDER), PER_TOKEN),
        "gptq-w4a4": (GPTQ(W4_SYM_G128), PER_TOKEN_4),
        "smoothquant-gptq-w4a8": (SmoothQuant(0.5, fold_into_linears=True), GPTQ(W4_SYM_G128), PER_TOKEN),
        **{name: float_steps("rtn", name) for name in FLOAT_SCHEMES},
    }
    assert list(steps) == list(PRESETS), "every preset has a name, a description (preset_names.py) and steps (here)"
    return steps


# presets that quantize the embedding and head too (on this grid; the rest keep them in float)
OUTSIDE_GRIDS = {"w4g128-e8": E8_G128, "w4g128-e6": E6_G128, "gptq-w4g128-e6": E6_G128}


def preset_names() -> dict[str, str]:
    """Name -> one-line description of every preset."""
    return dict(PRESETS)


def resolve_recipe(name_or_path: str) -> Recipe:
    """A preset name, a weight-only grid point named like the presets, or the path of a JSON recipe file."""
    kind, point = parse_recipe_name(name_or_path)
    rotation = split_rotation(name_or_path)
    if kind == "rotated" and rotation is not None:
        online, inner = rotation
        return rotated(resolve_recipe(inner), online)
    if kind == "preset":
        grid = OUTSIDE_GRIDS.get(name_or_path)
        return Recipe(steps=_steps()[name_or_path], name=name_or_path, embeddings=grid, head=grid)
    if kind == "file":
        return Recipe.from_file(name_or_path)
    if kind == "ggml":
        return k_recipe(*point)  # type: ignore[misc]
    if kind == "float":
        method, scheme = point  # type: ignore[misc]
        return Recipe(steps=float_steps(method, scheme), name=name_or_path.lower())
    return sweep_recipe(*point)


def rotated(inner: Recipe, online: bool) -> Recipe:
    """``inner`` with the residual stream rotated first (and, ``online``, o_proj / down_proj's inputs at run time),
    named ``rotate-NAME`` / ``quarot-NAME``."""
    prefix = QUAROT_PREFIX if online else ROTATE_PREFIX
    return dataclasses.replace(inner, steps=(Rotate(online=online), *inner.steps), name=prefix + inner.name)


def k_recipe(method: str, ktype: str) -> Recipe:
    """``method`` (a K_METHODS name; "imatrix": RTN fitted under the inputs' importance) on llama.cpp's K-quant grid
    ``ktype`` ("Q4_K": every Linear) or mix ("Q4_K_M": each Linear's, the embedding's and the head's type as
    llama-quantize chooses it), named like ``gptq-q4_k`` / ``imatrix-q4_k_m``."""
    grid = WeightQuant.k_grid(ktype)
    steps = (RTN(grid, importance=True),) if method == "imatrix" else _method_steps(grid, method)
    head = {"rtn": "", "gptq-actorder": "gptq-"}.get(method, f"{method}-")
    tail = "-actorder" if method == "gptq-actorder" else ""
    outside = grid if grid.ggml in K_MIXES else None  # WeightQuant.for_table chooses each table's type
    return Recipe(steps=steps, name=f"{head}{ktype.lower()}{tail}", embeddings=outside, head=outside)


def float_steps(method: str, scheme: str) -> tuple:
    """The steps of float scheme ``scheme`` (preset_names.FLOAT_SCHEMES) with ``method`` rounding its weights:
    "fp8" per-tensor FP8 weights and static FP8 inputs, "fp8-dynamic" per-channel weights and per-token inputs,
    "nvfp4a16" / "mxfp4a16" weights only, "nvfp4" / "mxfp4" their inputs too."""
    kind = scheme.removesuffix("-dynamic").removesuffix("a16").upper()
    static_fp8 = scheme == "fp8"
    grid = WeightQuant.float_grid(kind, "tensor" if static_fp8 else "channel")
    weights = _method_steps(grid, method)
    if scheme.endswith("a16"):
        return weights
    inputs = ActQuant(bits=grid.bits, granularity="tensor" if static_fp8 else "token", dynamic=not static_fp8,
                      float_type=kind)
    return (*weights, inputs)


def _method_steps(grid: WeightQuant, method: str) -> tuple:
    """The steps of sweep method ``method`` on ``grid`` (each built on demand: a step checks its grid)."""
    return {
        "rtn": lambda: (RTN(grid),),
        "gptq": lambda: (GPTQ(grid),),
        "gptq-actorder": lambda: (GPTQ(grid, **ACT_ORDER),),
        "awq": lambda: (AWQ(grid),),
        "awq-gptq": lambda: (AWQ(grid), GPTQ(grid)),
        "autoround": lambda: (AutoRound(grid),),
        "awq-autoround": lambda: (AWQ(grid), AutoRound(grid)),
    }[method]()


def outside_grid(bits: int) -> WeightQuant:
    """The embedding and head grid of a "-eN" recipe name: INT N asymmetric, groups of 128 along the hidden size."""
    return WeightQuant(bits=bits, symmetric=False, granularity="group", group_size=128)


def sweep_recipe(
    method: str, bits: int, group_size: int, outside_bits: int = 0, symmetric: bool = False, fit: str = "range",
    budget: float | None = None,
) -> Recipe:
    """One point of a quant-curve sweep: ``method`` at ``bits`` with an asymmetric (``symmetric``: symmetric) grid of
    ``group_size`` columns (0 = per output channel) fitted by ``fit`` (a WeightQuant fit), with the embedding and
    head on ``outside_grid(outside_bits)`` unless 0 (float), each Linear's grid planned to ``budget`` bits per weight
    around this one unless None. Named like the presets (``gptq-w4g128``, ``gptq-w4g128-sym``, ``gptq-w3g128-mse``,
    ``w4g128-e6``, ``gptq-w4g128-b3.5``), so a sweep point equal to a preset is it."""
    rotation = split_rotation(method)
    if method in ROTATED_SWEEP_METHODS and rotation is not None:
        online, inner = rotation
        return rotated(sweep_recipe(inner, bits, group_size, outside_bits, symmetric, fit, budget), online)
    if method not in SWEEP_METHODS:
        raise LowbitError(f"unknown sweep method {method!r}; pick from {', '.join(SWEEP_METHODS + ROTATED_SWEEP_METHODS)}")
    if group_size < 0:
        raise LowbitError(f"group size {group_size} is negative; use 0 for per-channel or e.g. 128")
    if fit not in FIT_SUFFIXES.values():
        raise LowbitError(f"a sweep's fit is one of {', '.join(FIT_SUFFIXES.values())}, got {fit!r}; pick one of them")
    grid = WeightQuant(bits=bits, symmetric=symmetric, granularity="group" if group_size else "channel",
                       group_size=group_size or 128, fit=fit)
    head = {"rtn": "", "gptq-actorder": "gptq-"}.get(method, f"{method}-")
    fit_suffix = {v: k for k, v in FIT_SUFFIXES.items()}[fit]
    tail = ("-actorder" if method == "gptq-actorder" else "") + ("-sym" if symmetric else "") + fit_suffix + \
        (f"-b{budget:g}" if budget is not None else "") + (f"-e{outside_bits}" if outside_bits else "")
    outside = outside_grid(outside_bits) if outside_bits else None
    return Recipe(steps=_method_steps(grid, method), name=f"{head}w{bits}{f'g{group_size}' if group_size else 'pc'}{tail}",
                  embeddings=outside, head=outside, budget=budget)
