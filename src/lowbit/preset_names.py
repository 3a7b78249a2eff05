"""The recipe names lowbit accepts, importable without torch: the preset names and descriptions, the grid-point
names, and the check of a name. lowbit/presets.py builds the recipes these names stand for (it imports the recipe
classes, and with them torch); the command line checks ``--recipe``/``--recipes``/``lowbit recipes NAME`` with
``check_recipe_name`` while the options are parsed, and lists the presets, without building a recipe.
"""

from __future__ import annotations

import re
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.numerics.kquant_mix import K_MIXES

# the float schemes (llm-compressor's names, lower case), rounded to nearest; "gptq-nvfp4a16", "awq-mxfp4",
# "gptq-fp8-dynamic-actorder" put another method on the same grid (FLOAT_NAME)
FLOAT_SCHEMES: dict[str, str] = {
    "fp8": "FP8 E4M3 per-tensor weights, static per-tensor FP8 inputs (W8A8)",
    "fp8-dynamic": "FP8 E4M3 per-channel weights, dynamic per-token FP8 inputs (W8A8)",
    "nvfp4a16": "NVFP4 weights: E2M1, an E4M3 scale per 16 columns and a float32 one per tensor",
    "nvfp4": "NVFP4 weights and inputs (W4A4; inputs scaled per 16 features of each token)",
    "mxfp4a16": "MXFP4 weights: E2M1, a power-of-two scale per 32 columns",
    "mxfp4": "MXFP4 weights and inputs (W4A4; inputs scaled per 32 features of each token)",
}
# name -> one-line description; lowbit/presets.py gives each its steps
PRESETS: dict[str, str] = {
    "w8": "RTN INT8 symmetric per-channel weights",
    "w4g128": "RTN INT4 asymmetric g128 weights (the demo default)",
    "w3g128": "RTN INT3 asymmetric g128 weights",
    "gptq-w4g128": "GPTQ INT4 g128",
    "gptq-w4g128-actorder": "GPTQ INT4 g128 with act-order (groups in column order, H off-diagonal shrunk 10%)",
    "gptq-w3g128": "GPTQ INT3 g128",
    "awq-w4g128": "AWQ scale + clip search, INT4 g128",
    "awq-w3g128": "AWQ scale + clip search, INT3 g128",
    "awq-gptq-w4g128": "AWQ scales and clip, then GPTQ rounding, INT4 g128",
    "w8a8-naive": "INT8 per-tensor weights and per-tensor static INT8 inputs (the naive baseline)",
    "w8a8-token": "INT8 per-channel weights, per-token dynamic INT8 inputs",
    "smoothquant-w8a8": "SmoothQuant a=0.5, INT8 per-channel weights, per-token dynamic INT8 inputs",
    "smoothquant-w8a8-static": "SmoothQuant a=0.5, INT8 per-channel weights, per-tensor static INT8 inputs",
    "smoothquant-all-w8a8-static": (
        "SmoothQuant a=0.5 on norm and Linear->Linear inputs (up->down too), INT8 per-channel weights, "
        "per-tensor static INT8 inputs"
    ),
    "llm-int8": "LLM.int8(): outlier input columns (|x|>6) in float, the rest INT8",
    "magnitude-50": "magnitude pruning, 50% unstructured",
    "wanda-50": "Wanda pruning, 50% unstructured",
    "wanda-2of4": "Wanda pruning, 2:4 semi-structured",
    "wanda-2of4-w4g128": "Wanda 2:4, then RTN INT4 g128",
    "sparsegpt-50": "SparseGPT 50% unstructured",
    "sparsegpt-2of4": "SparseGPT 2:4 semi-structured",
    "w4g128-e8": "RTN INT4 g128 weights, embedding and head INT8 g128 (the whole model quantized)",
    "w4g128-e6": "RTN INT4 g128 weights, embedding and head INT6 g128 (a llama.cpp Q4_K_M-class size)",
    "gptq-w4g128-e6": "GPTQ INT4 g128, embedding and head INT6 g128 (RTN)",
    "w4a8": "RTN INT4 symmetric g128 weights, per-token dynamic INT8 inputs",
    "gptq-w4a8": "GPTQ INT4 symmetric g128 weights, per-token dynamic INT8 inputs",
    "gptq-w4a8-actorder": "GPTQ act-order INT4 symmetric g128 weights, per-token dynamic INT8 inputs",
    "gptq-w4a4": "GPTQ INT4 symmetric g128 weights, per-token dynamic INT4 inputs",
    "smoothquant-gptq-w4a8": (
        "SmoothQuant a=0.5 on norm and Linear->Linear inputs, GPTQ INT4 symmetric g128, per-token dynamic INT8 inputs"
    ),
    **FLOAT_SCHEMES,
}

# any weight-only grid point is a recipe name too: "gptq-w4g64", "w3pc", "awq-gptq-w4g32", "gptq-w4g128-actorder",
# "autoround-w3g128" (AutoRound's published defaults: 200 steps),
# with "-sym" on a symmetric grid ("gptq-w4g128-sym": what compressed-tensors readers load), "-mse" / "-imse" on a
# range-searched one ("gptq-w3g128-mse": fit "mse"; "w3g128-imse": fit "imatrix-mse", numerics/range_search.py),
# "-bB" for mixed precision to a budget of B bits per weight, each Linear's grid chosen around this one by its
# measured sensitivity ("gptq-w4g128-b3.5"; pipeline/sensitivity.py),
# and with "-eN" its
# embedding and head on INT N g128 too ("awq-w4g128-e8"); `lowbit compare --methods M... --bits
# B... --group-sizes G...` sweeps SWEEP_METHODS
SWEEP_NAME = re.compile(
    r"(?:(?P<method>gptq|awq|awq-gptq|autoround|awq-autoround)-)?w(?P<bits>[2-8])(?:g(?P<group>[1-9][0-9]*)|pc)(?P<actorder>-actorder)?"
    r"(?P<sym>-sym)?(?P<fit>-mse|-imse)?(?:-b(?P<budget>[0-9]+(?:\.[0-9]+)?))?(?:-e(?P<outside>[2-8]))?"
)
FIT_SUFFIXES = {"": "range", "-mse": "mse", "-imse": "imatrix-mse"}
SWEEP_METHODS = ("rtn", "gptq", "gptq-actorder", "awq", "awq-gptq", "autoround", "awq-autoround")
# a llama.cpp K-quant grid or mix is a recipe name too: "q4_k" (RTN, every Linear Q4_K), "gptq-q4_k", "awq-q6_k",
# "gptq-q4_k_m" (llama-quantize's Q4_K_M mix of types, for the embedding and head too), "gptq-q3_k_m-actorder"
# (numerics/kquant.py, numerics/kquant_mix.py; widths that are not multiples of 256 get the type's fallback grid)
# "imatrix-q4_k_m": RTN whose fit is weighed by the calibration inputs (llama-quantize --imatrix)
K_NAME = re.compile(r"(?:(?P<method>gptq|awq|awq-gptq|imatrix)-)?(?P<ktype>q[2-6]_k(?:_[sml])?)(?P<actorder>-actorder)?")
K_METHODS = (*SWEEP_METHODS, "imatrix")
FLOAT_NAME = re.compile(r"(?P<method>gptq|awq|awq-gptq)-(?P<scheme>fp8-dynamic|fp8|nvfp4a16|nvfp4|mxfp4a16|mxfp4)"
                        r"(?P<actorder>-actorder)?")


ROTATE_PREFIX = "rotate-"  # any recipe name after it, with the residual stream rotated first (methods/rotate.py)
QUAROT_PREFIX = "quarot-"  # the same, and o_proj / down_proj rotate their inputs at run time (QuaRot's online Hadamard)
# the sweep takes them too ("--methods rotate-gptq quarot-gptq"); an online rotation goes with the roundings that
# need no equivalence transform of their own and fit an integer grid (methods/rotate.py refuses the rest)
ROTATED_SWEEP_METHODS = (*(ROTATE_PREFIX + m for m in SWEEP_METHODS),
                         *(QUAROT_PREFIX + m for m in ("rtn", "gptq", "gptq-actorder")))


def split_rotation(name: str) -> tuple[bool, str] | None:
    """(online, the name after the prefix) of a ``rotate-NAME`` / ``quarot-NAME`` recipe or sweep method; else None."""
    prefix = next((p for p in (ROTATE_PREFIX, QUAROT_PREFIX) if name.startswith(p)), None)
    return None if prefix is None else (prefix == QUAROT_PREFIX, name.removeprefix(prefix))


def parse_recipe_name(name_or_path: str) -> tuple[str, tuple[str, int, int, int, bool, str, float | None] | None]:
    """("preset" | "file" | "sweep" | "ggml" | "float", (method, bits, group size or 0, embedding/head bits or 0,
    symmetric, fit, budget or None) for a grid point, (method, K type) for a K-quant one, (method, scheme) for a float one) of
    a name lowbit takes for a recipe (whether a file holds a valid recipe is checked when it is read); else the
    one-line unknown-recipe error."""
    if name_or_path in PRESETS:
        return "preset", None
    rotation = split_rotation(name_or_path)
    if rotation is not None and not Path(name_or_path).exists():
        prefix = QUAROT_PREFIX if rotation[0] else ROTATE_PREFIX
        if parse_recipe_name(rotation[1])[0] == "file":
            raise LowbitError(f"unknown recipe {name_or_path!r}: \"{prefix}\" goes before a recipe name "
                              f"({prefix}gptq-w4a8), not a file; put {{\"type\": \"rotate\"}} first in the file's "
                              "steps instead")
        return "rotated", None
    float_point = FLOAT_NAME.fullmatch(name_or_path.lower())
    if float_point is not None and (float_point["method"] == "gptq" or not float_point["actorder"]):
        method = float_point["method"] + ("-actorder" if float_point["actorder"] else "")
        return "float", (method, float_point["scheme"])  # type: ignore[return-value]
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        return "file", None
    k_point = K_NAME.fullmatch(name_or_path.lower())
    if k_point is not None and (k_point["ktype"].count("_") == 1 or k_point["ktype"].upper() in K_MIXES):
        method = (k_point["method"] or "rtn") + ("-actorder" if k_point["actorder"] else "")
        if method in K_METHODS:
            return "ggml", (method, k_point["ktype"].upper())  # type: ignore[return-value]
    sweep = SWEEP_NAME.fullmatch(name_or_path)
    if sweep is not None:
        method = (sweep["method"] or "rtn") + ("-actorder" if sweep["actorder"] else "")
        if method in SWEEP_METHODS:
            return "sweep", (method, int(sweep["bits"]), int(sweep["group"] or 0), int(sweep["outside"] or 0),
                             bool(sweep["sym"]), FIT_SUFFIXES[sweep["fit"] or ""],
                             float(sweep["budget"]) if sweep["budget"] else None)
    raise LowbitError(
        f"unknown recipe {name_or_path!r}: pass a preset ({', '.join(PRESETS)}), a weight-only grid point named like "
        "the presets (e.g. gptq-w4g64, awq-w3pc, w2g32, gptq-w4g64-actorder, gptq-w4g128-sym, gptq-w3g128-mse, w3g128-imse, "
        "awq-w4g128-e8; gptq-w4g128-b3.5 plans each Linear's grid to 3.5 bits per weight; rotate-NAME rotates the residual "
        "stream first, e.g. rotate-gptq-w4a8; quarot-NAME rotates down_proj's inputs online too), a llama.cpp "
        "K-quant grid or mix (q4_k, imatrix-q4_k_m, gptq-q4_k_m, awq-q6_k, gptq-q3_k_m-actorder), a float scheme with a "
        "method (gptq-nvfp4a16, awq-mxfp4a16, gptq-fp8-dynamic) or the path of a JSON recipe file"
    )


def check_recipe_name(name_or_path: str) -> str:
    """``name_or_path`` unchanged if it names a recipe, else the unknown-recipe error: the ``type=`` of every recipe
    option (argparse only catches ValueError, so the LowbitError reaches ``main``), checked before torch is imported."""
    parse_recipe_name(name_or_path)
    return name_or_path
