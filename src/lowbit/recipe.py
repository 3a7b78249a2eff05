"""Recipes: typed, frozen, validated descriptions of what to do to a model.

A recipe is an ordered tuple of steps (``SmoothQuant(alpha=0.5), GPTQ(WeightQuant(bits=4))``). Each step
validates itself in ``__post_init__``; the recipe validates the order. Recipes serialise to JSON and are stored
in every output directory, so a checkpoint always says how it was made. The CLI only builds these objects;
library code never sees argparse.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError
from lowbit.methods.act_quant import ActQuant
from lowbit.methods.autoround import AutoRound
from lowbit.methods.awq import AWQ
from lowbit.methods.base import (
    GRANULARITIES, RECIPE_FIX, ROTATE, STAGE_NAMES, TRANSFORM, Needs, Step, WeightQuant, check,
)
from lowbit.methods.gptq import GPTQ
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.prune import Prune, parse_pattern
from lowbit.methods.registry import STEP_TYPES
from lowbit.methods.rotate import Rotate
from lowbit.methods.rtn import RTN
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.methods.sparsegpt import SparseGPT
from lowbit.schema import check_fields, check_record, check_value, read_json

__all__ = [
    "GRANULARITIES", "RECIPE_FIX", "STEP_TYPES", "AWQ", "AutoRound", "GPTQ", "RTN", "ActQuant", "LLMInt8", "Prune", "Recipe", "Rotate",
    "SmoothQuant", "SparseGPT", "Step", "WeightQuant", "parse_pattern", "step_from_dict",
]
if TYPE_CHECKING:
    from torch import nn

    from lowbit.models.arch import Arch
    from lowbit.pipeline.rotate import OutsideRotation

_WEIGHT_FIELDS = {f.name for f in dataclasses.fields(WeightQuant)}
_check = check


def step_from_dict(data: dict[str, Any], stored: bool = False) -> Step:
    """Build a step from JSON; weight-grid keys may be nested under 'weights' or given flat. A ``stored`` step (read
    back from an output or a report) lacking a field its class ``predates`` gets the value it was made with."""
    check_value(data, dict[str, Any], "recipe step", RECIPE_FIX)
    data = dict(data)
    kind = data.pop("type", None)
    if not isinstance(kind, str) or kind not in STEP_TYPES:
        raise LowbitError(f"unknown recipe step type {kind!r}; known types: {', '.join(STEP_TYPES)}")
    cls, where = STEP_TYPES[kind], f"recipe step {kind!r}"
    if stored:
        data = {**cls.predates, **data}
    names = {f.name for f in dataclasses.fields(cls)}
    if "weights" in names:
        flat = {k: data.pop(k) for k in list(data) if k in _WEIGHT_FIELDS}
        nested = data.get("weights")
        check_value(nested, dict[str, Any] | None, where, RECIPE_FIX, "weights")
        optional = next(f for f in dataclasses.fields(cls) if f.name == "weights").default is None
        if nested is not None or flat or not optional:
            grid = {**(nested or {}), **flat}
            check_record(grid, WeightQuant, where, RECIPE_FIX, "weights")
            data["weights"] = WeightQuant(**grid)
    unknown = set(data) - names
    if unknown:
        raise LowbitError(f"recipe step {kind!r} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class Recipe:
    """An ordered, validated list of steps plus the Linear layers to leave alone (fnmatch patterns)."""

    steps: tuple[Step, ...]
    ignore: tuple[str, ...] = ("lm_head",)
    name: str = "custom"
    # the tensors outside the decoder blocks: the input embedding table (quantized per row, dequantized at lookup)
    # and the output head, each on its own grid, rounded to nearest; None keeps them in float. A tied embedding and
    # head are one tensor: quantized once, on one grid (runtime/embedding.py)
    embeddings: WeightQuant | None = None
    head: WeightQuant | None = None
    # mixed precision to a budget: the stored bits per weight (scales and zero points included) over the blocks'
    # Linears that the recipe compresses; each Linear's grid is then chosen from the rounding grid's candidates by
    # its measured sensitivity (pipeline/sensitivity.py) when the recipe runs, and written into ``plan``
    budget: float | None = None
    # a grid per Linear by full name ("model.layers.3.mlp.down_proj"), overriding the steps' grid there: a budget's
    # choice (or written by hand); Linears it does not name keep the steps' grid
    plan: dict[str, WeightQuant] = field(default_factory=dict, hash=False)  # recipes stay hashable
    # a recipe read back from an output or a report: it was checked when it was made, by the rules of that time;
    # the steps' composition rules (which later versions may tighten) are not applied to it again
    stored: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_fields(self, "recipe", RECIPE_FIX)  # before the tuples are made: "lm_head" is not a list of patterns
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        _check(len(self.steps) > 0, "a recipe needs at least one step", 'add one, e.g. {"type": "rtn"}')
        stages = [s.stage for s in self.steps]
        if stages != sorted(stages):
            order = ", then ".join(
                f"{name} ({', '.join(k for k, c in STEP_TYPES.items() if c.stage == stage)})"
                for stage, name in STAGE_NAMES.items()
            )
            raise LowbitError(f"recipe steps are out of order: {order}; got {[s.kind for s in self.steps]}; {RECIPE_FIX}")
        rounding = [s for s in self.steps if s.rounds]
        _check(len(rounding) <= 1, f"a recipe rounds the weights once, got {[s.kind for s in rounding]}")
        pruning = [s for s in self.steps if s.prunes]
        _check(len(pruning) <= 1, f"a recipe prunes at most once, got {[s.kind for s in pruning]}")
        for stage in (ROTATE, TRANSFORM):
            same = [s.kind for s in self.steps if s.stage == stage]
            _check(len(same) <= 1, f"use one {STAGE_NAMES[stage]} step per recipe, got {same}")
        self._check_k_grids()
        self._check_float_grids()
        self._check_plan()
        for key in ("embeddings", "head"):  # fitted without per-column input weights (a tied head is the embedding)
            grid = getattr(self, key)
            _check(grid is None or not grid.weighs_inputs, f"the {key} grid's {grid.fit if grid else ''} fit weighs "
                   "columns by their calibration inputs, which the embedding and head grids are fitted without",
                   'use "fit": "mse" there')
        if not self.stored:
            for step in self.steps:
                step.check_recipe(self)

    def _check_k_grids(self) -> None:
        """K-quant grids (llama.cpp's Q2_K .. Q6_K, or a mix: the embedding and head then get the types llama-quantize
        gives them, ``WeightQuant.for_table``) never on pruned weights: their offset dmin * m cannot hold an exact
        zero, so a pruned weight would come back non-zero."""
        k_grids = [s.grid.ggml for s in self.steps if s.grid is not None and s.grid.ggml]
        if not k_grids:
            return
        _check(len(set(k_grids)) == 1, f"the steps' grids must agree, got {sorted(set(k_grids))}")
        _check(not self.prunes, f"{k_grids[0]} cannot hold pruned weights exactly (its offsets are not multiples of "
               "its steps)", "round pruned weights on an integer grid (e.g. bits 4 symmetric g32: Q4_0)")
        _check(not self.quantizes_inputs, f"{k_grids[0]} is a weight-only grid (llama.cpp computes activations in "
               "float)", "drop the activation quantization step")
        _check(not any(getattr(s, "act_order", False) and not getattr(s, "static_groups", True) for s in self.steps),
               f"{k_grids[0]} blocks are in column order, which act-order groups with a g_idx (static_groups=false) "
               "break", "use act-order's default static groups")
        plain = [s.grid.label for s in self.steps if s.grid is not None and not s.grid.ggml]
        _check(not plain, f"every step searches or rounds on the same grid; got {k_grids[0]} and {plain}")
        # llama-quantize refuses Q2_K_S without an importance matrix: mostly 2-bit rounded blind is far off
        # (SmolLM2 in llama.cpp: 82.3 rounded to nearest, 18.9 with an importance; docs/kquants.md)
        _check(k_grids[0] != "Q2_K_S" or self.needs_calibration, "Q2_K_S rounded to nearest without the inputs' "
               "importance is far from the model (llama-quantize refuses it too)",
               "use imatrix-q2_k_s or gptq-q2_k_s, or q2_k_m for a data-free 2-bit mix")

    def _check_float_grids(self) -> None:
        """Float grids (FP8, MXFP4, NVFP4) on the blocks' Linears, one type per recipe, in column-order groups."""
        for key in ("embeddings", "head"):
            grid = getattr(self, key)
            _check(grid is None or not grid.float_type, f"the {key} grid is {grid.label if grid else ''}: float grids "
                   "are for the blocks' Linears", "give it an integer grid (e.g. bits 8 symmetric g32) or none")
        types = {s.grid.float_type for s in self.steps if s.grid is not None}
        if types == {""} or not types:
            return
        _check(len(types) == 1, f"every step searches or rounds on the same grid; got {sorted(types)}")
        _check(not any(getattr(s, "act_order", False) and not getattr(s, "static_groups", True) for s in self.steps),
               f"{types.pop()} blocks are in column order, which act-order groups with a g_idx (static_groups=false) "
               "break", "use act-order's default static groups")

    def _check_plan(self) -> None:
        """A budget or a plan chooses among integer grids for a weight-only recipe's rounding step."""
        if self.budget is None and not self.plan:
            return
        what = f"a budget ({self.budget:g} bits per weight)" if self.budget is not None else "a per-Linear plan"
        _check(self.budget is None or 1.0 < self.budget <= 16.0,
               f"budget must be bits per weight in (1, 16], got {self.budget}", 'e.g. "budget": 3.5')
        step = self.weight_step
        grid = step.grid if step is not None else None
        _check(grid is not None and not grid.ggml and not grid.float_type,
               f"{what} chooses integer grids for the recipe's rounding; this recipe rounds on "
               f"{grid.label if grid is not None else 'no grid'}",
               "use an RTN/GPTQ/AWQ/AutoRound step on an integer grid (e.g. gptq-w4g128)")
        _check(not self.quantizes_inputs, f"{what} is for weight-only recipes; this one quantizes activations too",
               "drop the activation step")
        _check(not any(getattr(s, "act_order", False) and not getattr(s, "static_groups", True) for s in self.steps),
               f"{what} counts each Linear's stored grid, and act-order groups with a g_idx (static_groups=false) "
               "add an int32 per column", "use act-order's default static groups")
        for name, linear_grid in self.plan.items():
            _check(not linear_grid.ggml and not linear_grid.float_type,
                   f"plan grid for {name} is {linear_grid.label}; a plan holds integer grids")
            # the steps collect statistics and search clips for the rounding grid's fit, one per recipe
            _check(linear_grid.fit == grid.fit, f"plan grid for {name} is fitted by {linear_grid.fit!r}, the "
                   f"recipe's rounding by {grid.fit!r}", "give every plan grid the rounding grid's fit")

    @property
    def transform(self) -> Step | None:
        """The recipe's equivalence transform (SmoothQuant, AWQ), if any."""
        return next((s for s in self.steps if s.stage == TRANSFORM), None)

    @property
    def block_transforms(self) -> tuple[Step, ...]:
        """The steps that transform a whole block before compression, in order: a rotation, then SmoothQuant/AWQ."""
        return tuple(s for s in self.steps if s.stage <= TRANSFORM)

    def outside(self, model: nn.Module, arch: Arch, tied: bool) -> OutsideRotation | None:
        """What the recipe does to the tensors outside the blocks (``Step.outside``: a rotation), or None."""
        return next((o for o in (s.outside(model, arch, tied) for s in self.steps) if o is not None), None)

    @property
    def effective_steps(self) -> tuple[Step, ...]:
        """The steps as they run: with the rounding a transform implies when no step rounds (AWQ alone rounds with
        RTN on its grid), in stage order."""
        implied = [] if any(s.rounds for s in self.steps) else [
            r for r in (s.implied_rounding() for s in self.steps) if r is not None
        ][:1]
        # within a stage, pruning first: SparseGPT and GPTQ share the rounding stage, and GPTQ must round the pruned
        # weights keeping SparseGPT's mask, whichever order the recipe lists them in
        return tuple(sorted((*self.steps, *implied), key=lambda s: (s.stage, not s.prunes)))

    @property
    def weight_step(self) -> Step | None:
        """The step that rounds weights (a transform's implied rounding included)."""
        return next((s for s in self.effective_steps if s.rounds), None)

    def needs(self) -> Needs:
        """What the steps read from each Linear's inputs, together."""
        needs = Needs()
        for step in self.effective_steps:
            needs = needs | step.needs()
        return needs

    @property
    def sequential(self) -> bool:
        """Whether the block's Linears are compressed stage by stage (GPTQ's true-sequential; off by its option)."""
        return all(s.sequential for s in self.steps)

    @property
    def quantizes_inputs(self) -> bool:
        return any(s.quantizes_inputs for s in self.steps)

    @property
    def prunes(self) -> bool:
        return any(s.prunes for s in self.steps)

    @property
    def method_label(self) -> str:
        """The per-layer report's method label, e.g. 'awq + rtn W4 asym g128'."""
        return " + ".join(s.label for s in self.effective_steps)

    def check_export(self, fmt: str) -> None:
        """Refuse, before any work, a recipe whose output the exporter ``fmt`` cannot hold."""
        for step in self.effective_steps:
            step.check_export(fmt)
        if (self.budget is not None or self.plan) and fmt in ("gguf", "gptq"):
            held = {"gguf": "GGUF's integer types are fixed grids (Q4_0, Q4_1, Q8_0 on 32 columns)",
                    "gptq": "a GPTQ checkpoint has one grid for every Linear"}[fmt]
            raise LowbitError(f"{held}, and this recipe plans a grid per Linear (bit widths and group sizes): export "
                              "--format compressed-tensors (symmetric grids), or for llama.cpp use a K-quant mix "
                              "(gptq-q4_k_m)")
        float_grid = next((s.grid.float_type for s in self.steps if s.grid is not None and s.grid.float_type), "")
        if float_grid and fmt in ("gguf", "gptq"):
            raise LowbitError(f"{float_grid} is a float grid, which {fmt.upper()} cannot hold: export --format "
                              "compressed-tensors (vLLM reads FP8, NVFP4 and MXFP4 from it)")
        k_grid = next((s.grid.ggml for s in self.steps if s.grid is not None and s.grid.ggml), "")
        if k_grid and fmt != "gguf":
            raise LowbitError(
                f"{k_grid} is llama.cpp's grid, which only GGUF holds: export --format gguf, or quantize on an integer "
                f"grid for {fmt} (e.g. gptq-w4g128-sym)"
            )
        if self.quantizes_outside_blocks and fmt == "compressed-tensors":
            raise LowbitError(
                "compressed-tensors has no quantized embedding, and vLLM reads its head in float: export a recipe "
                "without 'embeddings'/'head' (GGUF holds them on 32-column grids)"
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether any step reads calibration inputs (statistics or a SmoothQuant/AWQ search). RTN, magnitude
        pruning, LLM.int8() and dynamic activation quantization are data-free."""
        return self.budget is not None or any(s.needs_calibration for s in self.effective_steps)

    def reusing_transforms(self, path: str) -> Recipe:
        """This recipe with its SmoothQuant/AWQ step re-applying the scales (and clips) saved in ``path`` (an earlier
        output directory, or its transforms.safetensors) instead of searching them again."""
        step = self.transform
        _check(step is not None and hasattr(step, "artifact"),
               "re-applying saved transforms needs a recipe with a smoothquant or awq step",
               "drop --transforms or pick such a recipe")
        steps = tuple(dataclasses.replace(s, artifact=path) if s is step else s for s in self.steps)
        return dataclasses.replace(self, steps=steps)

    def with_budget(self, budget: float) -> Recipe:
        """This recipe planned anew to ``budget`` bits per weight (any plan it had dropped), named "NAME-bBUDGET"."""
        name = re.sub(r"-b[0-9.]+(?=(-e[2-8])?$)", "", self.name)
        outside = re.search(r"-e[2-8]$", name)  # the name grammar's order: ...-b3.5-e6 (preset_names.SWEEP_NAME)
        at = outside.start() if outside else len(name)
        return dataclasses.replace(self, budget=budget, plan={}, name=f"{name[:at]}-b{budget:g}{name[at:]}")

    @property
    def label(self) -> str:
        """One line naming each step and its weight grid, e.g. 'awq W4 asym g128 + gptq W4 asym g128'."""
        parts = []
        for step in self.steps:
            grid = getattr(step, "weights", None)
            parts.append(f"{step.kind} {grid.label}" if grid is not None else step.kind)
        budget = "" if self.budget is None else f", each Linear's grid planned to {self.budget:g} bits per weight"
        return " + ".join(parts) + budget

    def find(self, cls: type[Step]) -> Any:
        return next((s for s in self.steps if isinstance(s, cls)), None)

    @property
    def quantizes_outside_blocks(self) -> bool:
        return self.embeddings is not None or self.head is not None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "steps": [s.to_dict() for s in self.steps], "ignore": list(self.ignore)}
        for key in ("embeddings", "head"):  # only when set: recipes without them keep their JSON
            grid = getattr(self, key)
            if grid is not None:
                out[key] = dataclasses.asdict(grid)
        if self.budget is not None:
            out["budget"] = self.budget
        if self.plan:
            out["plan"] = {name: dataclasses.asdict(grid) for name, grid in self.plan.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], stored: bool = False) -> Recipe:
        """A recipe from decoded JSON: an object with a 'steps' list of step objects, optional 'ignore' and 'name'.
        ``stored``: read back from an output or a report (see the field)."""
        check_value(data, dict[str, Any], "recipe", RECIPE_FIX)
        unknown = sorted(set(data) - set(_RECIPE_KEYS))
        if unknown:
            raise LowbitError(f"recipe has unknown keys {unknown}; known: {list(_RECIPE_KEYS)}; {RECIPE_FIX}")
        if "steps" not in data:
            raise LowbitError('a recipe needs a \'steps\' list, e.g. {"steps": [{"type": "rtn"}]}; ' + RECIPE_FIX)
        check_value(data["steps"], list[dict[str, Any]], "recipe", RECIPE_FIX, "steps")
        grids = {}
        for key in ("embeddings", "head"):
            if data.get(key) is not None:
                check_record(data[key], WeightQuant, "recipe", RECIPE_FIX, key)
                try:
                    grids[key] = WeightQuant(**data[key])
                except LowbitError as exc:
                    raise LowbitError(f"recipe {key}: {exc}") from None
        check_value(data.get("budget"), float | None, "recipe", RECIPE_FIX, "budget")
        check_value(data.get("plan", {}), dict[str, WeightQuant], "recipe", RECIPE_FIX, "plan")
        plan = {}
        for name, grid in data.get("plan", {}).items():
            try:
                plan[name] = WeightQuant(**grid)
            except LowbitError as exc:
                raise LowbitError(f"recipe plan {name}: {exc}") from None
        return cls(
            steps=tuple(step_from_dict(s, stored) for s in data["steps"]),
            ignore=data.get("ignore", ("lm_head",)),
            name=data.get("name", "custom"),
            stored=stored,
            budget=None if data.get("budget") is None else float(data["budget"]),
            plan=plan,
            **grids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A JSON recipe file (UTF-8, or UTF-16 with a BOM); every problem is one line naming the file."""
        path = Path(path)
        data = read_json(path, "recipe file", RECIPE_FIX)
        try:
            return cls.from_dict(data)
        except LowbitError as exc:
            raise LowbitError(f"recipe file {path}: {exc}") from None


_RECIPE_KEYS = ("name", "steps", "ignore", "embeddings", "head", "budget", "plan")
