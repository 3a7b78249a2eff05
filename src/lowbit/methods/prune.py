"""Pruning by a score: magnitude (|W|, one threshold per matrix) or Wanda (|W_ij| * ||X_j||_2, compared per output
row; Sun et al. 2023), unstructured or N:M (N kept of every M consecutive inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.errors import LowbitError
from lowbit.methods.base import PRUNE, RECIPE_FIX, Compression, LinearStats, Needs, Step, check
from lowbit.numerics.prune import magnitude_scores, prune_mask, wanda_scores


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
    check(0 < kept < group, f"sparsity pattern N:M needs 0 < N < M, got {pattern!r}")
    return kept, group


def check_sparsity(sparsity: float | None, pattern: str) -> None:
    nm = parse_pattern(pattern)
    if nm is None:
        check(
            sparsity is not None and 0.0 < sparsity < 1.0,
            f"unstructured pruning needs sparsity in (0, 1), got {sparsity}", "e.g. sparsity=0.5",
        )
    else:
        check(sparsity is None, f"pattern {pattern!r} fixes the sparsity", "leave sparsity unset (null)")


def sparsity_label(sparsity: float | None, pattern: str) -> str:
    return pattern if pattern != "unstructured" else f"{sparsity:.0%}"


@dataclass(frozen=True)
class Prune(Step):
    """Magnitude (score |W|) or Wanda (score |W_ij| * ||X_j||_2, compared per output row) pruning."""

    kind: ClassVar[str] = "prune"
    stage: ClassVar[int] = PRUNE
    prunes: ClassVar[bool] = True
    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"

    def check(self) -> None:
        check(self.method in ("magnitude", "wanda"), f"prune method must be 'magnitude' or 'wanda', got {self.method!r}")
        check_sparsity(self.sparsity, self.pattern)

    @property
    def label(self) -> str:
        return f"{self.method} {sparsity_label(self.sparsity, self.pattern)}"

    def needs(self) -> Needs:
        return Needs(input_norm=self.method == "wanda")

    def compress(self, c: Compression, stats: LinearStats) -> None:
        if self.method == "wanda":
            assert stats.input_norm is not None
            scores = wanda_scores(c.weight, stats.input_norm)
        else:
            scores = magnitude_scores(c.weight)
        mask = prune_mask(scores, self.sparsity, parse_pattern(self.pattern), per_row=self.method == "wanda")
        c.weight = c.weight.masked_fill(mask, 0.0)
        c.keep = ~mask
