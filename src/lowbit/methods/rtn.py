"""Round-to-nearest onto an integer grid: the baseline every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.methods.base import ROUND, Compression, LinearStats, Step, WeightQuant
from lowbit.numerics.rtn import rtn


@dataclass(frozen=True)
class RTN(Step):
    """Round-to-nearest on the weight grid; needs no calibration statistics."""

    kind: ClassVar[str] = "rtn"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)

    @property
    def rounds(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"rtn {self.weights.label}"

    def compress(self, c: Compression, stats: LinearStats) -> None:
        c.qweight = rtn(c.weight, self.weights)
