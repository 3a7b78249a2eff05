"""RotatedInput: a Linear computing on its input rotated at run time (QuaRot's online Hadamard before down_proj).

y = inner(x Q), with inner's weight stored as W Q (Q orthogonal: the float function is x W^T). Q's factors
(numerics/rotation.py: signs and a small odd-order orthogonal matrix; the Hadamard part is applied by butterflies)
are stored buffers, so the module computes what it was calibrated with wherever it is loaded. The inner module is
any runtime Linear (weight-only, W8A8, ...): it quantizes the rotated input, whose outlier channels are spread.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics.rotation import rotate_last_dim, rotation_factors


def refuse_online_rotations(model: nn.Module, fmt: str) -> None:
    """No export format says that a Linear rotates its input at run time: written without it, the model would
    compute something else."""
    rotated = next((name for name, m in model.named_modules() if isinstance(m, RotatedInput)), None)
    if rotated is not None:
        raise LowbitError(f"{rotated} rotates its input at run time (an online rotation), which {fmt} cannot say; "
                          "quantize with an offline rotation only (rotate-, not quarot-) to export")


class RotatedInput(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, seed: int, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        signs, mix = rotation_factors(in_features, seed)
        self.register_buffer("signs", signs.to(device=device, dtype=torch.float32))  # [in]
        self.register_buffer("mix", mix.to(device=device, dtype=torch.float32))  # [m, m]
        # a placeholder until the inner runtime module is set (``around``, or the loader at "<path>.inner")
        self.inner: nn.Module = nn.Linear(in_features, out_features, bias=False, device="meta")

    @classmethod
    def around(cls, inner: nn.Module, in_features: int, out_features: int, seed: int) -> RotatedInput:
        device = next(itertools.chain(inner.parameters(), inner.buffers()), torch.empty(0)).device
        module = cls(in_features, out_features, seed, device=device)
        module.inner = inner
        return module

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "seed": self.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = rotate_last_dim(x.float(), self.signs, self.mix)  # [..., in], in float32 whatever x's dtype
        return self.inner(rotated.to(x.dtype))

    def calibration_stand_in(self, dtype: torch.dtype) -> RotatedInput:
        """The same rotation around the inner module's stand-in (a dequantized Linear for a weight-only one)."""
        stand_in = getattr(self.inner, "calibration_stand_in", None)
        inner = stand_in(dtype) if callable(stand_in) else self.inner
        module = RotatedInput.around(inner, self.in_features, self.out_features, self.seed)
        module.signs, module.mix = self.signs, self.mix
        return module
