"""Mixed precision to a budget: each Linear's grid chosen so that the whole model's stored bits meet a budget and the
summed sensitivity (the estimated loss increase of rounding each Linear on its grid) is least.

A multiple-choice knapsack: each Linear picks one of its ``Choice``s (a grid, the bits it stores, the error it
costs) so that the bits fit the budget and the summed error is least. HAWQ-V3 states the same problem as an integer
program; here it is solved exactly by dynamic programming over the budget cut into small units (``allocate``),
which takes about a second for hundreds of Linears, and by its Lagrangian relaxation for thousands (mixtures of
experts); tests/test_bit_budget.py checks the first against brute force, the second against the Lagrangian dual
bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import WeightQuant
from lowbit.numerics.grid import group_count
from lowbit.numerics.packing import packed_length

# the candidate bit widths and group sizes a budget chooses among (a per-channel base grid: bit widths only)
BUDGET_BITS = (2, 3, 4, 5, 6, 8)
BUDGET_GROUPS = (32, 64, 128)
FP16_BITS = 16
RESOLUTION = 1 << 16  # the budget's units in the exact allocation
EXACT_LINEARS = 2048  # the exact allocation's table is Linears x RESOLUTION bytes (128 MiB here)


def stored_bits(grid: WeightQuant, out_features: int, in_features: int) -> int:
    """Bits an [out, in] weight takes on ``grid`` as lowbit stores it (runtime/weight_only.py): packed codes, a
    float16 scale per group (per row or tensor) and, asymmetric, packed zero points."""
    per_tensor = grid.granularity == "tensor"
    group = {"tensor": in_features, "channel": in_features}.get(grid.granularity, grid.group_size)
    n_groups, rows = group_count(in_features, group), 1 if per_tensor else out_features
    zeros = 0 if grid.symmetric else rows * packed_length(n_groups, grid.bits) * 8
    return out_features * packed_length(in_features, grid.bits) * 8 + rows * n_groups * FP16_BITS + zeros


def plan_bits(plan: dict[str, WeightQuant], linears: dict[str, nn.Linear]) -> float:
    """Stored bits per weight of ``plan`` (grid by full name) over ``linears`` (by full name)."""
    total = sum(stored_bits(plan[name], *lin.weight.shape) for name, lin in linears.items())
    return total / sum(lin.weight.numel() for lin in linears.values())


def linear_bits_per_weight(modules: dict[str, dict], linears: Iterable[str]) -> float | None:
    """Stored bits per weight of the Linears named ``linears`` (the blocks' compressed Linears, as the run's report
    lists them) of a lowbit output, from its lowbit_config.json ``modules`` (class and constructor arguments by module
    name); None where one is not on an integer grid (K-quant, float, sparse, LLM.int8() modules store otherwise)."""
    bits = weights = 0
    for name in linears:
        config = modules.get(name)
        if config is not None and config["class"] == "RotatedInput":  # an online rotation around the stored Linear
            config = modules.get(f"{name}.inner")  # (its factors: in_features + m^2 floats, not counted)
        if config is None or config["class"] != "WeightOnlyLinear":
            return None
        n_in, n_out = config["in_features"], config["out_features"]
        grid = WeightQuant(bits=config["bits"], symmetric=config["symmetric"],
                           granularity="tensor" if config["per_tensor"] else "group",
                           group_size=min(config["group_size"], n_in))
        g_idx = 32 * n_in if config.get("has_g_idx") else 0  # act-order's int32 group of each column
        bits, weights = bits + stored_bits(grid, n_out, n_in) + g_idx, weights + n_in * n_out
    return bits / weights if weights else None


def candidate_grids(base: WeightQuant) -> list[WeightQuant]:
    """The grids a budget chooses among for a recipe whose grid is ``base``: its symmetry and fit at every bit width
    of BUDGET_BITS, on groups of BUDGET_GROUPS columns and its own (per channel where ``base`` is)."""
    if base.granularity != "group":
        return [dataclasses.replace(base, bits=b) for b in BUDGET_BITS]
    groups = sorted({*BUDGET_GROUPS, base.group_size})  # the recipe's own group size is always a candidate
    return [dataclasses.replace(base, bits=b, group_size=g) for b in BUDGET_BITS for g in groups]


@dataclass(frozen=True)
class Choice:
    """One grid a Linear may take: the ``bits`` it stores there and the ``error`` (sensitivity) it costs."""

    grid: WeightQuant
    bits: int
    error: float


def pareto(choices: list[Choice]) -> list[Choice]:
    """The choices no other beats (fewer or as many bits and less error), by bits: a choice with more bits and no
    less error than another is never worth taking."""
    front: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.bits, c.error)):
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


def allocate(options: dict[str, list[Choice]], budget_bits: float) -> dict[str, Choice]:
    """One choice per Linear (``options``: its choices, by name) with stored bits summing to at most
    ``budget_bits`` and the least total error: the exact dynamic program over budget units up to EXACT_LINEARS
    Linears; beyond (its table would not fit in memory: mixtures of experts have thousands), the Lagrangian
    relaxation with a greedy fill, whose gap is a small share of the total there (on 300 Linears it was already
    0.6% below the exact program's estimate, whose unit rounding left 0.2% of the budget unspent). Deterministic."""
    names = sorted(options)
    fronts = [pareto(options[n]) for n in names]
    smallest = sum(f[0].bits for f in fronts)
    if smallest > budget_bits:
        raise LowbitError(f"the budget ({budget_bits:,.0f} bits) is below the smallest plan ({smallest:,} bits, every "
                          "Linear on its fewest bits); raise the budget")
    picks = _exact(fronts, budget_bits) if len(fronts) <= EXACT_LINEARS else _relaxed(fronts, budget_bits)
    chosen = {name: fronts[i][k] for i, (name, k) in enumerate(zip(names, picks))}
    return {name: chosen[name] for name in options}


def _exact(fronts: list[list[Choice]], budget_bits: float) -> list[int]:
    """The knapsack solved exactly by dynamic programming over the budget cut into RESOLUTION units, each choice's
    bits rounded up to whole units (so the plan always fits; the rounding leaves at most one unit per Linear
    unspent: 0.3% of the budget for 200 Linears). Returns each Linear's choice on its front."""
    unit = max(1.0, budget_bits / RESOLUTION)
    capacity = int(budget_bits // unit)
    least = np.zeros(capacity + 1)  # least error of the Linears so far within c units, for each c
    picks = np.zeros((len(fronts), capacity + 1), dtype=np.uint8)  # the choice that got it, per Linear
    for i, front in enumerate(fronts):
        best = np.full(capacity + 1, np.inf)
        for k, c in enumerate(front):
            w = math.ceil(c.bits / unit)
            if w > capacity:
                break
            candidate = least[: capacity + 1 - w] + c.error  # [capacity + 1 - w]: spending w units on choice k
            better = candidate < best[w:]
            best[w:][better] = candidate[better]
            picks[i, w:][better] = k
        least = best
    if not np.isfinite(least[capacity]):
        return _relaxed(fronts, budget_bits)  # the unit rounding alone overflowed a budget that fits: no rounding
    out, c = [0] * len(fronts), capacity
    for i in reversed(range(len(fronts))):
        out[i] = int(picks[i, c])
        c -= math.ceil(fronts[i][out[i]].bits / unit)
    return out


def _relaxed(fronts: list[list[Choice]], budget_bits: float) -> list[int]:
    """Each Linear's choice minimising error + lam * bits, lam the smallest price whose plan fits (bisected), then
    the upgrades that still fit, best error saved per bit first. Within one choice's step of the optimum per
    Linear, which among thousands of Linears is a small share of the total."""
    width = max(len(f) for f in fronts)
    bits = np.zeros((len(fronts), width))  # [Linears, choices], a short front padded with choices of infinite error
    errors = np.full((len(fronts), width), np.inf)
    for i, f in enumerate(fronts):
        bits[i, : len(f)] = [c.bits for c in f]
        errors[i, : len(f)] = [c.error for c in f]
    rows = np.arange(len(fronts))

    def plan(lam: float) -> np.ndarray:
        return np.argmin(errors + lam * bits, axis=1)

    def spent(picks: np.ndarray) -> float:
        return float(bits[rows, picks].sum())

    low, high = 0.0, float(errors[:, 0].max()) + 1.0  # at high every Linear takes its fewest bits
    while spent(plan(high)) > budget_bits:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if spent(plan(mid)) <= budget_bits else (mid, high)
    picks = [int(k) for k in plan(high)]
    left = budget_bits - spent(np.array(picks))
    upgrades = sorted(
        ((errors[i, picks[i]] - errors[i, k]) / (bits[i, k] - bits[i, picks[i]]), i, k)
        for i, f in enumerate(fronts) for k in range(picks[i] + 1, len(f))
    )[::-1]
    for _, i, k in upgrades:
        cost = bits[i, k] - bits[i, picks[i]]
        if k > picks[i] and cost <= left:
            left -= cost
            picks[i] = k
    return picks
