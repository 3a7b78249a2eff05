"""Calibration batches: N sequences of L tokens cut from the calibration documents, shuffled by a seed."""

from __future__ import annotations

import logging
import random

import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def calibration_ids(tokenizer, docs: list[str], n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token ids [n_sequences, seq_len]: the documents in a seeded random order, joined by blank lines,
    tokenized and cut into consecutive non-overlapping sequences."""
    if n_sequences < 1 or seq_len < 2:
        raise LowbitError(f"calibration needs n_sequences >= 1 and seq_len >= 2, got {n_sequences} x {seq_len}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = n_sequences * seq_len
    tokens: list[int] = []
    for start in range(0, len(order), 256):
        batch = [docs[i] + "\n\n" for i in order[start : start + 256]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            tokens.extend(ids)
        if len(tokens) >= need:
            break
    if len(tokens) < seq_len:
        raise LowbitError(
            f"calibration text has {len(tokens)} tokens, fewer than one sequence of {seq_len}; "
            "pass more text (--calib) or a smaller --seq-len"
        )
    if len(tokens) < need:
        n_sequences = len(tokens) // seq_len
        log.warning("calibration text holds only %d sequences of %d tokens; using those", n_sequences, seq_len)
    return torch.tensor(tokens[: n_sequences * seq_len], dtype=torch.long).view(n_sequences, seq_len)
