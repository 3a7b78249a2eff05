"""Orthogonal rotations of the residual stream (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

A rotation Q [d, d] with Q Q^T = I moves a hidden state x to x Q without changing its norm, so an RMSNorm commutes
with it (rms(x Q) = rms(x)), and a Linear reading the rotated state computes the same output from W Q. What it
changes is how a vector's energy is spread over the channels: a channel carrying 1000x the others' values is
spread over all of them, so a quantization grid fitted per token or per row no longer wastes its steps on it.

QuaRot uses a randomized Walsh-Hadamard matrix, which exists for powers of two; residual widths are often not one
(SmolLM2: 576 = 64 x 9, Qwen2.5 0.5B: 896 = 128 x 7). ``residual_rotation`` takes the Kronecker product of the
normalised Hadamard matrix of the largest power-of-two factor and a random orthogonal matrix of the odd rest, times
random signs: dense (every output channel mixes every input channel), orthogonal to float64 precision, and the same
for the same (width, seed) on every machine (a float64 CPU generator).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), normalised to be orthogonal: [n, n] float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / n**0.5


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n] float64: QR of a Gaussian matrix, R's diagonal signs moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def rotation_factors(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of Q = diag(signs) (H_{2^k} kron O_m), width = 2^k * m with m odd: signs [width] (+-1) and O_m
    [m, m] ([1, 1] of one when the width is a power of two), float64."""
    power = width & -width  # the largest power of two dividing width
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (width,), generator=generator, dtype=torch.float64) * 2 - 1
    odd = width // power
    mix = random_orthogonal(odd, generator) if odd > 1 else torch.ones(1, 1, dtype=torch.float64)
    return signs, mix


@lru_cache(maxsize=8)
def residual_rotation(width: int, seed: int) -> torch.Tensor:
    """Q [width, width] float64, orthogonal: diag(signs) (H_{2^k} kron O_m) (``rotation_factors``)."""
    signs, mix = rotation_factors(width, seed)
    return signs.unsqueeze(1) * torch.kron(hadamard(width // mix.shape[0]), mix)  # rows scaled by +-1: orthogonal


_CHUNK_BYTES = 1 << 22  # rows rotated together: each butterfly stage's reads and writes stay in the CPU's cache


def walsh_hadamard(y: torch.Tensor) -> torch.Tensor:
    """H y along dim -2 (its size a power of two), H the normalised Sylvester matrix, by log2 butterflies (no
    [p, p] matrix: an online rotation of a 14336-wide input would otherwise hold one per Linear).

    The butterflies run on two buffers in turn, a few MiB of rows at a time (each stage reads all of its input:
    cache-sized chunks, not a new tensor per stage; bench/eval_overhead.py's quarot rows); every value is the same
    sums in the same order as ``_stage_by_stage``, so the result is the same bits."""
    if torch.is_grad_enabled() and y.requires_grad:  # ops writing into buffers (out=) record no graph
        return _stage_by_stage(y)
    shape = y.shape
    p, m = shape[-2], shape[-1]
    flat = y.reshape(-1, p, m)  # [rows, p, m]
    out = torch.empty(flat.shape, dtype=y.dtype, device=y.device)
    rows = max(1, _CHUNK_BYTES // (p * m * y.element_size()))
    buffers = [torch.empty((min(rows, flat.shape[0]), p, m), dtype=y.dtype, device=y.device) for _ in range(2)]
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]  # [n, p, m], read only
        n = chunk.shape[0]
        torch.div(_butterflies(chunk, buffers[0][:n], buffers[1][:n]), p**0.5, out=out[start:start + n])
    return out.reshape(shape)


def _butterflies(source: torch.Tensor, target: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """The log2(p) butterfly stages (unnormalised) of source [n, p, m] along p, each written into target and spare
    in turn; returns the tensor holding the last stage (source itself when p == 1)."""
    n, p, m = source.shape
    h = 1
    while h < p:  # pairs (j, j + h) inside each run of 2h rows become (a + b, a - b): Sylvester's order
        pairs = source.reshape(n, p // (2 * h), 2, h, m)  # [n, runs, 2, h, m]: each run's two halves
        into = target.view(n, p // (2 * h), 2, h, m)
        torch.add(pairs[:, :, 0], pairs[:, :, 1], out=into[:, :, 0])
        torch.sub(pairs[:, :, 0], pairs[:, :, 1], out=into[:, :, 1])
        source, target, spare = target, spare, target
        h *= 2
    return source


def _stage_by_stage(y: torch.Tensor) -> torch.Tensor:
    """``walsh_hadamard`` with a new tensor per stage: the reference its buffered form reproduces bit for bit, and
    the form autograd can differentiate."""
    shape = y.shape
    p = shape[-2]
    h = 1
    while h < p:
        y = y.reshape(*shape[:-2], p // (2 * h), 2, h, shape[-1])
        y = torch.stack((y[..., 0, :, :] + y[..., 1, :, :], y[..., 0, :, :] - y[..., 1, :, :]), dim=-3)
        h *= 2
    return y.reshape(shape) / p**0.5


def rotate_last_dim(x: torch.Tensor, signs: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x Q for x [..., n], Q = diag(signs) (H_p kron O_m) with n = p * m, without forming Q: the row vector
    (x * signs) seen as X [p, m] becomes H X O_m (the Kronecker identity), in x's dtype."""
    m = mix.shape[0]
    y = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], x.shape[-1] // m, m)  # [..., p, m]
    if m == 1:  # O_1 = [[1]] (rotation_factors): the matmul computed 0 + y * 1, which is y with -0.0 made +0.0
        return walsh_hadamard(y).add_(0.0).reshape(x.shape)
    return (walsh_hadamard(y) @ mix.to(x.dtype)).reshape(x.shape)
