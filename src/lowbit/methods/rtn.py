"""Round-to-nearest onto an integer grid: the baseline every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.methods.base import ROUND, Compression, LinearStats, Needs, Step, WeightQuant, check
from lowbit.numerics.rtn import rtn


@dataclass(frozen=True)
class RTN(Step):
    """Round-to-nearest on the weight grid; needs no calibration statistics, unless ``importance``: then each
    input column's calibration mean square (llama.cpp's importance matrix, from ||X_j||^2) weighs the fit of the
    grids that search their scales (K-quant grids and "llama" fits, numerics/ggml_fit.py): llama-quantize with
    --imatrix. An "imatrix-mse" fit always reads it (its range search is weighted by it)."""

    kind: ClassVar[str] = "rtn"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)
    importance: bool = False

    def check(self) -> None:
        if self.weights.weighs_inputs:  # one spelling per run: the fit says it
            check(not self.importance, f"{self.weights.label} always weighs its search by the inputs",
                  "drop \"importance\"")
            return
        check(not self.importance or self.weights.fit == "llama",  # K grids always read fit "llama"
              f"rtn importance weighs a searched fit, but {self.weights.label} is fitted "
              + ("by an unweighted search" if self.weights.searched else "from its range"),
              "use a K-quant grid, \"fit\": \"llama\" or \"imatrix-mse\", or drop \"importance\"")

    @property
    def weighs(self) -> bool:
        """Whether the fit reads each input column's calibration importance."""
        return self.importance or self.weights.weighs_inputs

    def needs(self) -> Needs:
        return Needs(input_norm=self.weighs)

    @property
    def rounds(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"rtn {self.weights.label}{' imatrix' if self.importance else ''}"

    def compress(self, c: Compression, stats: LinearStats) -> None:
        importance = None
        if self.weighs:
            assert stats.input_norm is not None
            importance = stats.input_norm.float() ** 2  # [in]: sum over tokens of x_j^2
        c.qweight = rtn(c.weight, self.weights, importance, stats.tensor_absmax)
