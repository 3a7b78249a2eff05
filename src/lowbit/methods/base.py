"""What every method is: a recipe step type that says, in its own module, what it needs and what it does.

A step is a frozen, validated dataclass (its fields are the recipe's JSON) whose class declares:
  * ``kind`` (its JSON name) and ``stage`` (its place in a recipe: transform, prune, round, activations),
  * what it reads from each Linear's inputs (``needs``) and whether it needs calibration data at all,
  * what it does: ``transform_block`` (an equivalence transform over a block), ``adjust_weight`` (before
    compression, e.g. AWQ's clip), ``compress`` (prune and/or round one Linear's weight), ``runtime_module`` (the
    module that computes with the result),
  * its ``label`` in reports, the composition rules it imposes on a recipe (``check_recipe``) and what each
    exporter can hold of it (``check_export``).
The pipeline calls these hooks and nothing else: it never names a method (``methods/registry.py`` is the one list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics.float_formats import FLOAT_TYPES
from lowbit.numerics.kquant import FALLBACK_GROUP, K_TYPES, SUPER_BLOCK, k_type
from lowbit.numerics.kquant_mix import K_MIXES, LinearPlace, mix_type, table_type
from lowbit.numerics.range_search import SEARCHES
from lowbit.schema import check_fields

if TYPE_CHECKING:
    from lowbit.models.arch import Arch
    from lowbit.numerics.qweight import QWeight
    from lowbit.pipeline.context import BlockContext
    from lowbit.pipeline.rotate import OutsideRotation
    from lowbit.recipe import Recipe

GRANULARITIES = ("tensor", "channel", "group")
FITS = ("range", "llama", *SEARCHES)
RECIPE_FIX = "fix the recipe (`lowbit recipes gptq-w4g128` prints a valid one)"

# the order of a recipe: a rotation of the residual stream, equivalence transforms, then pruning, then rounding, then
# activation quantization
ROTATE, TRANSFORM, PRUNE, ROUND, ACTIVATIONS = -1, 0, 1, 2, 3
STAGE_NAMES = {ROTATE: "rotate", TRANSFORM: "transform", PRUNE: "prune", ROUND: "round", ACTIVATIONS: "activations"}


def check(condition: bool, message: str, fix: str = RECIPE_FIX) -> None:
    if not condition:
        raise LowbitError(f"{message}; {fix}")


@dataclass(frozen=True)
class WeightQuant:
    """An integer grid for weights: bit width, symmetric (absmax) or asymmetric (zero point), and granularity.

    ``granularity``: "tensor" (one scale), "channel" (one per output row) or "group" (one per
    ``group_size`` consecutive input columns of each row).
    ``ggml``: a llama.cpp K-quant type ("Q4_K", ...; numerics/kquant.py): the groups' scales (and mins) are
    themselves stored as small integers per 256 columns, as GGUF holds them. Its bits, symmetry and group size are
    the type's, stated in full so the recipe reads the same as any other grid (``WeightQuant.k_grid`` builds it).
    A Linear whose width is not a multiple of 256 gets the type's 32-column fallback grid, as in llama-quantize.
    ``fit``: "range" fits each group's scale (and zero) from its min and max (absmax for symmetric grids);
    "llama" as llama-quantize fits its 32-column types (numerics/ggml_fit.py): a symmetric group's largest-magnitude
    weight goes to the code -2**(bits-1) (signed scale), and where calibration gives each column an importance
    (GPTQ's Hessian diagonal, RTN's ``importance``) its scale comes from a weighted least-squares search; asymmetric
    groups keep their range (their zero point is an integer code). The fallback grids of the K types fit "llama";
    the K types themselves always do, each sub-block searched (a grid with ``ggml`` reads fit "llama").
    "mse" and "imatrix-mse" search each group's (row's, tensor's) range for the shrunk one whose grid rounds it with
    the least error, the latter weighing each column by its calibration inputs' mean square (llm-compressor's "mse"
    and "imatrix_mse" observers; numerics/range_search.py); the result is an ordinary grid (scale and zero per group)
    that every format holds.
    ``float_type``: a float grid (numerics/float_formats.py): "FP8" (E4M3 elements, one float32 scale per tensor,
    channel or group), "MXFP4" (E2M1, a power-of-two scale per 32 columns) or "NVFP4" (E2M1, an E4M3 scale per 16
    and a float32 one per tensor). Its bits, symmetry and (FP4) group size are the type's, stated in full
    (``WeightQuant.float_grid`` builds it); its fit is the range.
    """

    bits: int = 4
    symmetric: bool = False
    granularity: str = "group"
    group_size: int = 128
    ggml: str = ""
    fit: str = "range"
    float_type: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "weights", RECIPE_FIX)
        check(2 <= self.bits <= 8, f"weight bits must be in 2..8, got {self.bits}", "pick e.g. bits=4")
        check(
            self.granularity in GRANULARITIES,
            f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}",
        )
        check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        check(self.fit in FITS, f"weights fit must be one of {FITS}, got {self.fit!r}")
        if self.ggml:  # a K type has llama.cpp's fit only: the recipe says so (older recipes did not state it)
            check(self.fit in ("range", "llama"), f"{self.ggml} grids are fitted as llama.cpp fits them, got fit "
                  f"{self.fit!r}", "drop \"fit\" (or use \"imatrix-\" recipes: the K fit weighed by the inputs)")
            object.__setattr__(self, "fit", "llama")
        check(self.fit != "llama" or self.granularity == "group",
              f"the {self.fit!r} fit searches per group; this grid is per-{self.granularity}", "use granularity \"group\"")
        if self.float_type:
            self._check_float_type()
        if self.ggml:
            kt = K_TYPES.get(K_MIXES.get(self.ggml, self.ggml))
            check(kt is not None, f"weights ggml must be a K type ({', '.join(K_TYPES)}) or a llama.cpp mix "
                  f"({', '.join(K_MIXES)}), got {self.ggml!r}")
            assert kt is not None
            check(
                (self.bits, self.symmetric, self.granularity, self.group_size)
                == (kt.bits, not kt.asymmetric, "group", kt.sub),
                f"{self.ggml} is bits={kt.bits}, symmetric={str(not kt.asymmetric).lower()}, granularity=\"group\", "
                f"group_size={kt.sub}; this grid says bits={self.bits}, symmetric={str(self.symmetric).lower()}, "
                f"granularity={self.granularity!r}, group_size={self.group_size}",
                "state the type's own values (`lowbit recipes gptq-q4_k` prints a valid grid)",
            )

    def _check_float_type(self) -> None:
        ft = FLOAT_TYPES.get(self.float_type)
        check(ft is not None, f"weights float_type must be one of {', '.join(FLOAT_TYPES)}, got {self.float_type!r}")
        assert ft is not None
        check(not self.ggml, f"a grid is either llama.cpp's ({self.ggml}) or a float one ({self.float_type})")
        check(self.fit == "range", f"{ft.name} grids are fitted from their range, got fit {self.fit!r}")
        own = (ft.bits, True) + (("group", ft.block) if ft.block else (self.granularity, self.group_size))
        check(
            (self.bits, self.symmetric, self.granularity, self.group_size) == own,
            f"{ft.name} is bits={ft.bits}, symmetric=true" + (f", granularity=\"group\", group_size={ft.block}"
                                                              if ft.block else "")
            + f"; this grid says bits={self.bits}, symmetric={str(self.symmetric).lower()}, granularity="
            f"{self.granularity!r}, group_size={self.group_size}",
            "state the type's own values (`lowbit recipes nvfp4a16` prints a valid grid)",
        )

    @staticmethod
    def float_grid(name: str, granularity: str = "channel") -> WeightQuant:
        """The grid of float type ``name`` ("FP8", "MXFP4", "NVFP4"); ``granularity`` is FP8's (the FP4 types'
        is their block)."""
        ft = FLOAT_TYPES[name]
        if ft.block:
            return WeightQuant(bits=ft.bits, symmetric=True, granularity="group", group_size=ft.block, float_type=name)
        return WeightQuant(bits=ft.bits, symmetric=True, granularity=granularity, float_type=name)

    @staticmethod
    def k_grid(name: str) -> WeightQuant:
        """The grid of K-quant type ``name`` ("Q4_K"), or of llama.cpp mix ``name`` ("Q4_K_M": its base type's
        grid, each Linear's own type chosen by ``for_linear``)."""
        mix = K_MIXES.get(name.upper())
        kt = k_type(mix or name)
        return WeightQuant(bits=kt.bits, symmetric=not kt.asymmetric, granularity="group", group_size=kt.sub,
                           ggml=name.upper() if mix else kt.name)

    def for_linear(self, place: LinearPlace) -> WeightQuant:
        """The grid of the Linear at ``place``: a llama.cpp mix's choice for it, else this grid."""
        if self.ggml in K_MIXES:
            return WeightQuant.k_grid(mix_type(self.ggml, place))
        return self

    def for_width(self, in_features: int) -> WeightQuant:
        """The grid a Linear of ``in_features`` columns gets: a K type's 32-column fallback where the width is not
        a multiple of 256 (llama-quantize's rule), else this grid."""
        if not self.ggml or in_features % SUPER_BLOCK == 0:
            return self
        bits, symmetric = K_TYPES[K_MIXES.get(self.ggml, self.ggml)].fallback
        return WeightQuant(bits=bits, symmetric=symmetric, granularity="group", group_size=FALLBACK_GROUP, fit="llama")

    def for_table(self, head: bool, width: int) -> WeightQuant:
        """The grid of a table outside the blocks, ``width`` columns wide: the output head (``head``; also a tied
        embedding) or an untied input embedding. A llama.cpp mix gives each the type llama-quantize gives it
        (numerics/kquant_mix.py ``table_type``); a K type falls back where the width is not a multiple of 256, a
        head of a mix to Q8_0 as llama.cpp computes it (absmax / 127, no search); other grids are used as given."""
        if not self.ggml:
            return self
        grid = WeightQuant.k_grid(table_type(self.ggml, head)) if self.ggml in K_MIXES else self
        if head and self.ggml in K_MIXES and width % SUPER_BLOCK:
            return WeightQuant(bits=8, symmetric=True, granularity="group", group_size=FALLBACK_GROUP)
        return grid.for_width(width)

    @property
    def label(self) -> str:
        if self.ggml:
            return self.ggml
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        if self.float_type:
            return self.float_type if FLOAT_TYPES[self.float_type].block else f"{self.float_type} {grid}"
        searched = f" {self.fit}" if self.searched else ""
        return f"W{self.bits} {'sym' if self.symmetric else 'asym'} {grid}{searched}"

    @property
    def searched(self) -> bool:
        """Whether each group's range is searched (numerics/range_search.py) rather than taken or fitted."""
        return self.fit in SEARCHES

    @property
    def weighs_inputs(self) -> bool:
        """Whether the range search weighs each column by its calibration inputs (an "imatrix-mse" fit)."""
        return self.searched and SEARCHES[self.fit].weighted


@dataclass(frozen=True)
class Needs:
    """Statistics of each Linear's inputs a step reads while compressing it (collected stage by stage)."""

    hessian: bool = False
    hessian_skip_first: int = 0  # sequence positions left out of the Hessian
    input_norm: bool = False  # per input channel ||X_j||_2 (Wanda)
    input_absmax: bool = False  # per input channel max |X_j| (static activation scales)
    # the float model's own outputs of each block, from a second stream of float inputs carried along the quantized
    # one (AutoRound's targets: each block is tuned toward what the unquantized model computes there)
    float_targets: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.hessian or other.hessian, max(self.hessian_skip_first, other.hessian_skip_first),
            self.input_norm or other.input_norm, self.input_absmax or other.input_absmax,
            self.float_targets or other.float_targets,
        )


@dataclass
class LinearStats:
    """What was collected for one Linear (None where no step needs it)."""

    hessian: torch.Tensor | None = None  # [in, in]
    input_norm: torch.Tensor | None = None  # [in]
    input_absmax: torch.Tensor | None = None  # [in]
    tuned: Any = None  # what a block-level step learned for this Linear (``tune_block``: AutoRound's rounding)
    # the largest |w| over the Linears that share this one's input (q/k/v, gate/up), on grids with a tensor scale
    # (NVFP4): servers fuse those Linears and multiply them with one tensor scale (vLLM takes the largest)
    tensor_absmax: torch.Tensor | None = None


@dataclass
class Compression:
    """One Linear's weight as the steps leave it: ``weight`` [out, in] (pruned zeros included), ``keep`` the mask of
    weights kept by pruning (None: not pruned), ``qweight`` the integer weights once rounded (None: not rounded)."""

    weight: torch.Tensor
    keep: torch.Tensor | None = None
    qweight: QWeight | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """Base of every recipe step; every hook's default does nothing.

    Each field's value is checked against its annotated type here, before the step's own ``check`` (ranges,
    consistency) compares it: ``"bits": "4"`` or ``"symmetric": "no"`` is refused by the declaration itself.
    """

    kind: ClassVar[str] = ""
    stage: ClassVar[int] = ROUND
    prunes: ClassVar[bool] = False  # sets weights to zero
    quantizes_inputs: ClassVar[bool] = False  # computes on quantized activations (W8A8-style)
    # fields added with a default that changed what the step does: a stored recipe (an output's or a report's)
    # without one was made before it existed, with this value, and reads back so (recipe.step_from_dict)
    predates: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        check_fields(self, f"recipe step {self.kind!r}", RECIPE_FIX)
        self.check()

    def check(self) -> None:
        """Range and consistency rules beyond the field types; steps that have some override this."""

    def check_recipe(self, recipe: Recipe) -> None:
        """Rules this step imposes on the recipe around it (e.g. 'use it alone')."""

    # ---- what it is
    @property
    def rounds(self) -> bool:
        """Whether this step puts the weights on an integer grid."""
        return False

    @property
    def grid(self) -> WeightQuant | None:
        """The weight grid this step rounds or searches on."""
        return getattr(self, "weights", None)

    @property
    def label(self) -> str:
        """How the per-layer report names this step."""
        return self.kind

    def needs(self) -> Needs:
        return Needs()

    @property
    def sequential(self) -> bool:
        """Whether a block's Linears are compressed stage by stage, each fitted to the inputs the earlier stages'
        compressed outputs give (GPTQ's true-sequential order; it has an option to turn it off)."""
        return True

    @property
    def needs_calibration(self) -> bool:
        """Whether it reads calibration inputs (statistics, or a search over a block's outputs)."""
        return self.needs() != Needs()

    def implied_rounding(self) -> Step | None:
        """The rounding this step implies when the recipe has none (AWQ alone rounds with RTN on its grid)."""
        return None

    # ---- what it does
    def transform_block(
        self, ctx: BlockContext, batch_size: int, saved: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor] | None:
        """An output-preserving transform of the whole block before compression; returns the block's
        full-precision outputs (or None when this step has no such transform)."""
        return None

    def outside(self, model: nn.Module, arch: Arch, tied: bool) -> OutsideRotation | None:
        """What this step does to the tensors outside the blocks (embedding, final norm, head: a rotation of the
        residual stream), for ``model`` (a skeleton is enough) whose head is its embedding when ``tied``; None when
        nothing."""
        return None

    def tune_block(
        self, ctx: BlockContext, targets: list[torch.Tensor], weight_of: Callable[[str], torch.Tensor]
    ) -> dict[str, Any]:
        """Learn something for each Linear from the whole block before it is compressed (AutoRound's rounding):
        ``targets`` are the float model's outputs of this block per calibration batch (``Needs.float_targets``),
        ``weight_of(path)`` the float weight [out, in] the Linear will be compressed from (after
        ``adjust_weight``). Returns, per Linear path, what its ``compress`` reads as ``stats.tuned``."""
        return {}

    def adjust_weight(self, ctx: BlockContext, path: str, weight: torch.Tensor) -> torch.Tensor:
        """The float weight [out, in] before compression (AWQ's clip); unchanged by default."""
        return weight

    def compress(self, c: Compression, stats: LinearStats) -> None:
        """Prune and/or round ``c`` in place."""

    def runtime_module(self, c: Compression, bias: torch.Tensor | None, stats: LinearStats) -> nn.Module | None:
        """The runtime module computing with ``c`` when this step decides it (activation quantization, LLM.int8());
        None leaves it to the default (weight-only packed, or sparse when nothing was rounded)."""
        return None

    def check_export(self, fmt: str) -> None:
        """Refuse (LowbitError) a format that cannot hold what this step produces; ``fmt`` is "gguf",
        "compressed-tensors" or "gptq"."""

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if isinstance(value, WeightQuant) else value
        return out
