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
    --imatrix."""

    kind: ClassVar[str] = "rtn"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)
    importance: bool = False

    def check(self) -> None:
        check(not self.importance or self.weights.fit == "llama",  # K grids always read fit "llama"
              f"rtn importance weighs a searched fit, but {self.weights.label} is fitted from its range",
              "use a K-quant grid or \"fit\": \"llama\", or drop \"importance\"")

    def needs(self) -> Needs:
        return Needs(input_norm=self.importance)

    @property
    def rounds(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"rtn {self.weights.label}{' imatrix' if self.importance else ''}"

    def compress(self, c: Compression, stats: LinearStats) -> None:
        importance = None
        if self.importance:
            assert stats.input_norm is not None
            importance = stats.input_norm.float() ** 2  # [in]: sum over tokens of x_j^2
        c.qweight = rtn(c.weight, self.weights, importance, stats.tensor_absmax)
