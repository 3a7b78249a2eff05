"""The damped inverse Hessian that GPTQ and SparseGPT sweep with.

H = 2 X^T X / n_tokens over a layer's calibration inputs. Its inverse is taken through Cholesky factors; when H
is not positive definite enough (dead inputs, too few tokens) the damping lambda * mean(diag H) is raised tenfold
until the factorisation succeeds, and the damping actually used is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

MAX_DAMP = 1.0


@dataclass(frozen=True)
class InverseHessian:
    Hinv: torch.Tensor  # upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, [in, in]
    damp: float  # relative damping that succeeded
    retries: int  # how many times damping had to be raised


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy W [out, in] and H [in, in] to float32; inputs that never fired (H_jj = 0) get H_jj = 1 and W[:, j] = 0.

    Returns (W, H, dead) where dead is a bool [in] mask.
    """
    W = W.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def inverse_hessian(H: torch.Tensor, damp: float) -> InverseHessian:
    """Upper Cholesky factor of the damped inverse, raising damping tenfold on failure (up to 1.0)."""
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    retries = 0
    current = damp
    while current <= MAX_DAMP:
        L, info = torch.linalg.cholesky_ex(H + current * mean_diag * eye)
        if info.item() == 0:
            Hinv_full = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv_full, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return InverseHessian(U, current, retries)
        retries += 1
        current *= 10.0
    raise LowbitError(
        f"Hessian ({n}x{n}) is not positive definite even with damping {MAX_DAMP}: the calibration inputs of "
        "this layer are degenerate; use more or more varied calibration text (--nsamples, --calib)"
    )
