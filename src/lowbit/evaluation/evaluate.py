"""Evaluate a model by name or path: perplexity on the evaluation text, bytes on disk, load time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.data.calibration import check_ids_in_vocabulary
from lowbit.data.text import documents
from lowbit.evaluation.perplexity import Perplexity, evaluation_ids, perplexity
from lowbit.evaluation.tasks import TaskOptions, TaskScores, load_task_data, task_manager, task_scores
from lowbit.api import open_model
from lowbit.runtime.fast import exact_modules


@dataclass
class Evaluation:
    model: str
    perplexity: Perplexity
    disk_bytes: int
    memory_bytes: int  # parameters and buffers as stored and loaded (packed), before evaluation's float weights
    load_seconds: float
    tasks: TaskScores | None = None  # lm-eval task accuracy, where tasks were asked for

    def summary(self) -> dict:
        """The flat record that `lowbit eval --json` prints and comparison rows hold."""
        p = self.perplexity
        return {
            "perplexity": round(p.perplexity, 4),
            "tokens": p.tokens,
            "window": p.seq_len,
            "windows": p.windows,
            "disk_bytes": self.disk_bytes,
            "memory_bytes": self.memory_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "eval_seconds": round(p.seconds, 2),
            "eval_tokens_per_second": round(p.tokens / p.seconds, 1) if p.seconds > 0 else 0.0,
            **(self.tasks.summary() if self.tasks else {}),
        }


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def evaluate(
    spec: str,
    data: str,
    window: int,
    max_windows: int | None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    backend: str = "dequantized",
    tasks: TaskOptions | None = None,
) -> Evaluation:
    """Perplexity of any model lowbit opens, and its lm-eval task accuracy where ``tasks`` asks (the tasks and
    their data are checked before the model is loaded). A lowbit output is evaluated on the dequantized backend by
    default: the exact backend's logits, bit for bit, at float speed (each weight dequantized once, not in every
    forward)."""
    manager = task_manager(tasks) if tasks else None
    if tasks:
        load_task_data(tasks, manager)
    opened = open_model(spec, dtype, device, backend)
    limit = getattr(opened.model.config, "max_position_embeddings", None) or getattr(opened.model.config, "n_positions", window)
    seq_len = min(window, int(limit))
    ids = evaluation_ids(opened.tokenizer, documents(data, "evaluation"))
    check_ids_in_vocabulary(ids, opened.model.config)
    result = perplexity(opened.model, ids, seq_len, max_windows, device, progress)
    scores = task_scores(opened.model, opened.tokenizer, tasks, manager) if tasks else None
    with exact_modules(opened.model):
        memory = tensor_bytes(opened.model)
    return Evaluation(spec, result, opened.disk_bytes, memory, opened.load_seconds, scores)
