"""Error measures the numerics tests share: how far a compressed Linear's outputs land from the float ones."""

from __future__ import annotations

import torch


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """Relative output error of replacing a Linear's weight W by W_hat, on inputs X:

        ||X (W_hat - W)^T||_F / ||X W^T||_F

    with W, W_hat [out_features, in_features] and X [tokens, in_features] (so X W^T is [tokens, out_features]).
    The difference is taken on the weights before the product, so tiny errors (8-bit grids) are not lost to the
    rounding of two large outputs subtracted from each other."""
    return float((X @ (W_hat - W).T).norm() / (X @ W.T).norm())


def output_error_of_outputs(W: torch.Tensor, Y_hat: torch.Tensor, X: torch.Tensor) -> float:
    """Relative error of outputs Y_hat [tokens, out_features] against the float outputs Y = X W^T:

        ||Y_hat - X W^T||_F / ||X W^T||_F

    with W [out_features, in_features] and X [tokens, in_features]. For methods that change more than the weight
    (AWQ's X / s, quantized activations, LLM.int8()'s float outlier path), whose result is an output, not a W_hat."""
    Y = X @ W.T
    return float((Y_hat - Y).norm() / Y.norm())
