"""The precision calibration forwards run in.

A block's calibration passes (statistics, reference outputs, the pass that produces the next block's inputs) can
run their matmuls and attention in bfloat16 under autocast, where the hardware computes it natively (AVX-512 BF16
or AMX CPUs, recent GPUs; docs/speed.md has the time it saves and the quality it costs). What is computed from the
activations stays float32: Hessians, norms and ranges (observers cast their inputs), the error sums, the residual
stream (float32 + bfloat16 is float32), the weights being fitted and the fold proofs (run outside these passes, in
float32 at highest matmul precision).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from lowbit.errors import LowbitError

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype | None:
    """``--compute-dtype`` by name: None for float32 (the weights' own precision), else the autocast dtype."""
    if name not in COMPUTE_DTYPES:
        raise LowbitError(f"compute dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def lower_precision(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing when None)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def full_precision(x: torch.Tensor) -> AbstractContextManager:
    """Inside a lower-precision pass: what observers and error meters compute runs as written (float32)."""
    return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
