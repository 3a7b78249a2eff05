"""SparseGPT (Frantar & Alistarh 2023): Hessian-based pruning with error compensation, optionally rounding the kept
weights jointly (then it is the recipe's rounding step too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.methods.base import ROUND, Compression, LinearStats, Needs, Step, WeightQuant, check
from lowbit.methods.gptq import damp_note
from lowbit.methods.prune import check_sparsity, parse_pattern, sparsity_label
from lowbit.numerics.obs import sparsegpt


@dataclass(frozen=True)
class SparseGPT(Step):
    kind: ClassVar[str] = "sparsegpt"
    stage: ClassVar[int] = ROUND
    prunes: ClassVar[bool] = True
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    weights: WeightQuant | None = None
    damp: float = 0.01
    block_size: int = 128

    def check(self) -> None:
        check_sparsity(self.sparsity, self.pattern)
        check(0.0 < self.damp < 1.0, f"sparsegpt damp must be in (0, 1), got {self.damp}")
        check(self.block_size >= 1, f"sparsegpt block_size must be >= 1, got {self.block_size}")

    @property
    def rounds(self) -> bool:
        return self.weights is not None

    @property
    def label(self) -> str:
        return f"sparsegpt {sparsity_label(self.sparsity, self.pattern)}"

    def needs(self) -> Needs:
        return Needs(hessian=True)

    def compress(self, c: Compression, stats: LinearStats) -> None:
        assert stats.hessian is not None
        result = sparsegpt(
            c.weight, stats.hessian, self.sparsity or 0.0, parse_pattern(self.pattern), self.weights, self.damp,
            self.block_size, stats.tensor_absmax,
        )
        c.weight, c.qweight, c.keep = result.weight, result.qweight, ~result.pruned
        c.notes.append(damp_note(result.damp, result.retries))
