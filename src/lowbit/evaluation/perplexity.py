"""Perplexity the way the GPTQ paper measures it: the evaluation documents joined with "\\n\\n", tokenized once,
cut into non-overlapping windows of ``seq_len`` tokens; perplexity = exp(mean next-token NLL over all windows).
This is token-level perplexity, not lm-eval's word perplexity."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float


def evaluation_ids(tokenizer, docs: list[str]) -> torch.Tensor:
    """The evaluation stream [1, T]."""
    return tokenizer("\n\n".join(docs), return_tensors="pt").input_ids


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Perplexity:
    n_windows = ids.shape[1] // seq_len
    if n_windows == 0:
        raise LowbitError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seq_len}; use a smaller --seq-len")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    start = time.perf_counter()
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
            window = ids[:, i * seq_len : (i + 1) * seq_len].to(device)
            logits = model(input_ids=window, use_cache=False).logits  # [1, L, vocab]
            nll = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += seq_len - 1
    mean = total_nll / count
    return Perplexity(math.exp(mean), mean, count, n_windows, seq_len, time.perf_counter() - start)
