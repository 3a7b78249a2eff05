"""Calibration batches: N sequences of L tokens cut from the calibration documents, shuffled by a seed."""

from __future__ import annotations

import logging
import random
from typing import Any

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


def check_ids_in_vocabulary(ids: torch.Tensor, config: Any) -> None:
    """An id past the embedding table (a tokenizer larger than the model's vocabulary) is an IndexError deep inside
    the forward otherwise."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise LowbitError(
            f"the tokenizer produced token id {int(ids.max())} but the model's embedding has {vocab} rows "
            "(config.json vocab_size); use the tokenizer that belongs to this model"
        )


def check_positions(length: int, config: Any, option: str = "--seq-len") -> None:
    """Sequences longer than a learned position table (GPT-2's n_positions, OPT's max_position_embeddings) are an
    IndexError inside the forward; a rotary model has no table to run past: beyond its trained context it only
    gets a warning."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or length <= positions:
        return
    if any(getattr(config, key, None) is not None for key in ("rope_parameters", "rope_theta", "rope_scaling")):
        log.warning("sequences of %d tokens run beyond the model's trained context of %d positions", length, positions)
        return
    raise LowbitError(
        f"{option} asks for {length} tokens but the model has {positions} learned positions (config.json "
        f"max_position_embeddings / n_positions); ask for {positions} or fewer"
    )


def check_ids_fit_model(ids: torch.Tensor, config: Any) -> None:
    """Refuse calibration ids [N, L] the model cannot embed, before any forward pass."""
    check_ids_in_vocabulary(ids, config)
    check_positions(ids.shape[1], config)