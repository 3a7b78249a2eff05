"""Recipes: typed, frozen, validated descriptions of what to do to a model.

A recipe is an ordered tuple of steps (``SmoothQuant(alpha=0.5), GPTQ(WeightQuant(bits=4))``). Each step
validates itself in ``__post_init__``; the recipe validates the order. Recipes serialise to JSON and are stored
in every output directory, so a checkpoint always says how it was made. The CLI only builds these objects;
library code never sees argparse.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lowbit.errors import LowbitError
from lowbit.schema import check_fields, check_record, check_value, read_json

GRANULARITIES = ("tensor", "channel", "group")
RECIPE_FIX = "fix the recipe (`lowbit recipes gptq-w4g128` prints a valid one)"


def _check(condition: bool, message: str, fix: str = RECIPE_FIX) -> None:
    if not condition:
        raise LowbitError(f"{message}; {fix}")


@dataclass(frozen=True)
class WeightQuant:
    """An integer grid for weights: bit width, symmetric (absmax) or asymmetric (zero point), and granularity.

    ``granularity``: "tensor" (one scale), "channel" (one per output row) or "group" (one per
    ``group_size`` consecutive input columns of each row).
    """

    bits: int = 4
    symmetric: bool = False
    granularity: str = "group"
    group_size: int = 128

    def __post_init__(self) -> None:
        check_fields(self, "weights", RECIPE_FIX)
        _check(2 <= self.bits <= 8, f"weight bits must be in 2..8, got {self.bits}", "pick e.g. bits=4")
        _check(
            self.granularity in GRANULARITIES,
            f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}",
        )
        _check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")

    @property
    def label(self) -> str:
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        return f"W{self.bits} {'sym' if self.symmetric else 'asym'} {grid}"


@dataclass(frozen=True)
class Step:
    """Base of every recipe step; ``kind`` is the name used in JSON.

    Each field's value is checked against its annotated type here, before the step's own ``check`` (ranges,
    consistency) compares it: ``"bits": "4"`` or ``"symmetric": "no"`` is refused by the declaration itself.
    """

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, f"recipe step {self.kind!r}", RECIPE_FIX)
        self.check()

    def check(self) -> None:
        """Range and consistency rules beyond the field types; steps that have some override this."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if isinstance(value, WeightQuant) else value
        return out


@dataclass(frozen=True)
class RTN(Step):
    """Round-to-nearest on the weight grid; needs no calibration statistics."""

    kind: ClassVar[str] = "rtn"
    weights: WeightQuant = field(default_factory=WeightQuant)


@dataclass(frozen=True)
class GPTQ(Step):
    """GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback."""

    kind: ClassVar[str] = "gptq"
    weights: WeightQuant = field(default_factory=WeightQuant)
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    # Leave each calibration sequence's first positions out of the Hessian (0 = the paper's Hessian over every
    # token). Models that park massive activations on the attention-sink position let those tokens dominate H
    # (SmolLM2-135M, block 11 down_proj: position 0 is 95% of trace(H)). Skipping them made SmolLM2 worse (W4 g128
    # perplexity 20.75 vs 18.63): the sink's outputs matter. Kept for that experiment; act-order is the fix there.
    skip_first_positions: int = 0

    def check(self) -> None:
        _check(0.0 < self.damp < 1.0, f"gptq damp must be in (0, 1), got {self.damp}", "the usual value is 0.01")
        _check(self.block_size >= 1, f"gptq block_size must be >= 1, got {self.block_size}")
        _check(self.skip_first_positions >= 0, f"gptq skip_first_positions must be >= 0, got {self.skip_first_positions}")


@dataclass(frozen=True)
class AWQ(Step):
    """AWQ (Lin et al. 2023): activation-aware per-channel scale search, then weight clipping search.

    Only the equivalence transform and clip are searched here; the rounding is done by the recipe's weight
    quantizer (RTN with ``weights`` when the recipe has none, or e.g. a following GPTQ step). The search result
    is saved as ``transforms.safetensors`` in the output; ``artifact`` points a later run at it.
    ``replay_sequences`` bounds how many calibration sequences are replayed through each sub-module per grid
    point (the search cost); ``clip_tokens`` bounds the tokens used by the clip search.
    """

    kind: ClassVar[str] = "awq"
    weights: WeightQuant = field(default_factory=WeightQuant)
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    replay_sequences: int = 16
    clip_tokens: int = 512
    artifact: str | None = None  # re-apply scales/clips saved by an earlier run instead of searching

    def check(self) -> None:
        _check(self.n_grid >= 1, f"awq n_grid must be >= 1, got {self.n_grid}")
        _check(0.0 <= self.max_shrink < 1.0, f"awq max_shrink must be in [0, 1), got {self.max_shrink}")
        _check(self.replay_sequences >= 1, "awq replay_sequences must be >= 1")
        _check(self.clip_tokens >= 1, "awq clip_tokens must be >= 1")


@dataclass(frozen=True)
class SmoothQuant(Step):
    """SmoothQuant (Xiao et al. 2022): s_j = max|X_j|^a / max|W_j|^(1-a), folded into the preceding op.

    The paper folds into the norms before the attention and MLP inputs only. ``fold_into_linears`` also smooths
    the inputs whose previous op is a Linear (up_proj -> down_proj, fc1 -> fc2, v_proj -> o_proj where the shapes
    allow): on models whose largest outliers sit at down_proj's input (SmolLM2-135M: up to 1800x the median
    channel, see `lowbit outliers`), norm-only smoothing cannot reach them.
    """

    kind: ClassVar[str] = "smoothquant"
    alpha: float = 0.5
    fold_into_linears: bool = False
    artifact: str | None = None  # re-apply scales saved by an earlier run instead of calibrating

    def check(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, f"smoothquant alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class ActQuant(Step):
    """Quantize each Linear's input at run time: per-token or per-tensor, dynamic or static (calibrated)."""

    kind: ClassVar[str] = "act_quant"
    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    symmetric: bool = True

    def check(self) -> None:
        _check(2 <= self.bits <= 8, f"activation bits must be in 2..8, got {self.bits}")
        _check(
            self.granularity in ("token", "tensor"),
            f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}",
        )
        _check(
            self.dynamic or self.granularity == "tensor",
            "static activation quantization is per-tensor: use granularity='tensor' or dynamic=True",
        )

    @property
    def label(self) -> str:
        return f"A{self.bits} per-{self.granularity} {'dynamic' if self.dynamic else 'static'}"


@dataclass(frozen=True)
class LLMInt8(Step):
    """LLM.int8() (Dettmers et al. 2022): input columns with |x| > threshold in float, the rest in INT8."""

    kind: ClassVar[str] = "llm_int8"
    threshold: float = 6.0

    def check(self) -> None:
        _check(0 < self.threshold < math.inf, f"llm_int8 threshold must be a finite number > 0, got {self.threshold}")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N kept, M) e.g. '2:4' keeps 2 of every 4 consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        kept, group = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise LowbitError(
            f"sparsity pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}; {RECIPE_FIX}"
        ) from None
    _check(0 < kept < group, f"sparsity pattern N:M needs 0 < N < M, got {pattern!r}")
    return kept, group


def _check_sparsity(sparsity: float | None, pattern: str) -> None:
    nm = parse_pattern(pattern)
    if nm is None:
        _check(
            sparsity is not None and 0.0 < sparsity < 1.0,
            f"unstructured pruning needs sparsity in (0, 1), got {sparsity}", "e.g. sparsity=0.5",
        )
    else:
        _check(sparsity is None, f"pattern {pattern!r} fixes the sparsity", "leave sparsity unset (null)")


@dataclass(frozen=True)
class Prune(Step):
    """Magnitude (score |W|) or Wanda (score |W_ij| * ||X_j||_2, compared per output row) pruning."""

    kind: ClassVar[str] = "prune"
    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"

    def check(self) -> None:
        _check(self.method in ("magnitude", "wanda"), f"prune method must be 'magnitude' or 'wanda', got {self.method!r}")
        _check_sparsity(self.sparsity, self.pattern)


@dataclass(frozen=True)
class SparseGPT(Step):
    """SparseGPT (Frantar & Alistarh 2023): Hessian-based pruning, optionally quantizing jointly."""

    kind: ClassVar[str] = "sparsegpt"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    weights: WeightQuant | None = None
    damp: float = 0.01
    block_size: int = 128

    def check(self) -> None:
        _check_sparsity(self.sparsity, self.pattern)
        _check(0.0 < self.damp < 1.0, f"sparsegpt damp must be in (0, 1), got {self.damp}")
        _check(self.block_size >= 1, f"sparsegpt block_size must be >= 1, got {self.block_size}")


STEP_TYPES: dict[str, type[Step]] = {
    cls.kind: cls for cls in (RTN, GPTQ, AWQ, SmoothQuant, ActQuant, LLMInt8, Prune, SparseGPT)
}
_WEIGHT_FIELDS = {f.name for f in dataclasses.fields(WeightQuant)}

# Order in which step families may appear: transforms, then pruning, then rounding, then activations.
_RANK = {SmoothQuant: 0, AWQ: 0, Prune: 1, SparseGPT: 2, RTN: 2, GPTQ: 2, LLMInt8: 2, ActQuant: 3}


def step_from_dict(data: dict[str, Any]) -> Step:
    """Build a step from JSON; weight-grid keys may be nested under 'weights' or given flat."""
    check_value(data, dict[str, Any], "recipe step", RECIPE_FIX)
    data = dict(data)
    kind = data.pop("type", None)
    if not isinstance(kind, str) or kind not in STEP_TYPES:
        raise LowbitError(f"unknown recipe step type {kind!r}; known types: {', '.join(STEP_TYPES)}")
    cls, where = STEP_TYPES[kind], f"recipe step {kind!r}"
    names = {f.name for f in dataclasses.fields(cls)}
    if "weights" in names:
        flat = {k: data.pop(k) for k in list(data) if k in _WEIGHT_FIELDS}
        nested = data.get("weights")
        check_value(nested, dict[str, Any] | None, where, RECIPE_FIX, "weights")
        if nested is not None or flat or cls is not SparseGPT:
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

    def __post_init__(self) -> None:
        check_fields(self, "recipe", RECIPE_FIX)  # before the tuples are made: "lm_head" is not a list of patterns
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        _check(len(self.steps) > 0, "a recipe needs at least one step", 'add one, e.g. {"type": "rtn"}')
        ranks = [_RANK[type(s)] for s in self.steps]
        _check(
            ranks == sorted(ranks),
            "recipe steps are out of order: transforms (smoothquant, awq) first, then pruning, "
            f"then rounding (rtn, gptq, sparsegpt, llm_int8), then act_quant, got {[s.kind for s in self.steps]}",
        )
        rounding = [s for s in self.steps if isinstance(s, (RTN, GPTQ, LLMInt8))]
        rounding += [s for s in self.steps if isinstance(s, SparseGPT) and s.weights is not None]
        _check(len(rounding) <= 1, f"a recipe rounds the weights once, got {[s.kind for s in rounding]}")
        pruning = [s for s in self.steps if isinstance(s, (Prune, SparseGPT))]
        _check(len(pruning) <= 1, f"a recipe prunes at most once, got {[s.kind for s in pruning]}")
        _check(
            sum(isinstance(s, (AWQ, SmoothQuant)) for s in self.steps) <= 1,
            "use one equivalence transform per recipe (smoothquant or awq), not both",
        )
        if any(isinstance(s, LLMInt8) for s in self.steps):
            _check(len(self.steps) == 1, "llm_int8 is a complete scheme (INT8 weights and inputs): use it alone")
        if any(isinstance(s, ActQuant) for s in self.steps):
            _check(
                self.weight_step is not None,
                "act_quant needs a weight quantizer before it (e.g. rtn with bits=8, granularity='channel')",
            )

    @property
    def weight_step(self) -> Step | None:
        """The step that rounds weights; AWQ alone implies RTN on AWQ's grid."""
        for step in self.steps:
            if isinstance(step, (RTN, GPTQ, LLMInt8)) or (isinstance(step, SparseGPT) and step.weights is not None):
                return step
        awq = self.find(AWQ)
        return RTN(awq.weights) if awq is not None else None

    @property
    def input_statistics(self) -> tuple[bool, bool, bool]:
        """(Hessian, input norms, input absmax): the calibration statistics the steps read from each Linear's input."""
        act, prune = self.find(ActQuant), self.find(Prune)
        hessian = isinstance(self.weight_step, GPTQ) or self.find(SparseGPT) is not None
        return hessian, prune is not None and prune.method == "wanda", act is not None and not act.dynamic

    @property
    def needs_calibration(self) -> bool:
        """Whether any step reads calibration inputs (statistics or a SmoothQuant/AWQ search). RTN, magnitude
        pruning, LLM.int8() and dynamic activation quantization are data-free."""
        return any(self.input_statistics) or self.find(AWQ) is not None or self.find(SmoothQuant) is not None

    def reusing_transforms(self, path: str) -> Recipe:
        """This recipe with its SmoothQuant/AWQ step re-applying the scales (and clips) saved in ``path`` (an earlier
        output directory, or its transforms.safetensors) instead of searching them again."""
        step = self.find(AWQ) or self.find(SmoothQuant)
        _check(step is not None, "re-applying saved transforms needs a recipe with a smoothquant or awq step",
               "drop --transforms or pick such a recipe")
        steps = tuple(dataclasses.replace(s, artifact=path) if s is step else s for s in self.steps)
        return dataclasses.replace(self, steps=steps)

    @property
    def label(self) -> str:
        """One line naming each step and its weight grid, e.g. 'awq W4 asym g128 + gptq W4 asym g128'."""
        parts = []
        for step in self.steps:
            grid = getattr(step, "weights", None)
            parts.append(f"{step.kind} {grid.label}" if grid is not None else step.kind)
        return " + ".join(parts)

    def find(self, cls: type[Step]) -> Any:
        return next((s for s in self.steps if isinstance(s, cls)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps], "ignore": list(self.ignore)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """A recipe from decoded JSON: an object with a 'steps' list of step objects, optional 'ignore' and 'name'."""
        check_value(data, dict[str, Any], "recipe", RECIPE_FIX)
        unknown = sorted(set(data) - set(_RECIPE_KEYS))
        if unknown:
            raise LowbitError(f"recipe has unknown keys {unknown}; known: {list(_RECIPE_KEYS)}; {RECIPE_FIX}")
        if "steps" not in data:
            raise LowbitError('a recipe needs a \'steps\' list, e.g. {"steps": [{"type": "rtn"}]}; ' + RECIPE_FIX)
        check_value(data["steps"], list[dict[str, Any]], "recipe", RECIPE_FIX, "steps")
        return cls(
            steps=tuple(step_from_dict(s) for s in data["steps"]),
            ignore=data.get("ignore", ("lm_head",)),
            name=data.get("name", "custom"),
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


_RECIPE_KEYS = ("name", "steps", "ignore")
