"""Task accuracy through lm-evaluation-harness: any model lowbit opens (a lowbit output on its dequantized backend,
bit for bit the exact backend's logits) wrapped in lm-eval's own Hugging Face model class, so the requests, the
batching and the metrics are lm-eval's, and a score here is comparable with a score from `lm_eval --model hf`.

lm-eval is an optional dependency (``pip install 'lowbit[eval]'``). Its stock tasks read their datasets from the
Hugging Face Hub (or the local datasets cache); a machine without the Hub runs local tasks: a folder of task YAMLs
(``--tasks-dir``) whose ``dataset_path: json`` points at local files (docs/tasks.md has one).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'lowbit[eval]' (lm-eval 0.4)"
# the metric a results table shows for a task: the first of these it reports (every metric is kept in the results)
PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity")


@dataclass(frozen=True)
class TaskOptions:
    """What `--tasks` and its companions ask for; ``limit`` caps the examples per task (None: all of them)."""

    names: tuple[str, ...]
    tasks_dir: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8


def parse_task_names(text: str) -> tuple[str, ...]:
    """``--tasks hellaswag,arc_easy`` -> ("hellaswag", "arc_easy"); empty names refused."""
    names = tuple(name.strip() for name in text.split(","))
    if not names or any(not name for name in names):
        raise LowbitError(f"--tasks {text!r} has an empty task name; give comma-separated names, e.g. hellaswag,arc_easy")
    return names


def _lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise LowbitError(f"task accuracy needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    # lm-eval logs every request batch and warns that a model object (not a name) was passed: that is the design here
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval


@functools.lru_cache(maxsize=4)
def _indexed(tasks_dir: str | None) -> Any:
    """lm-eval's TaskManager: it reads every task YAML it ships (about 15,000 tasks, seconds), so a comparison
    builds it once, not once per row."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir)


def task_manager(options: TaskOptions) -> Any:
    """lm-eval's task index with ``tasks_dir`` (if any) searched first; unknown task names refused with the closest
    known ones, before any model is loaded."""
    _lm_eval()
    if options.tasks_dir is not None and not options.tasks_dir.is_dir():
        raise LowbitError(f"--tasks-dir {options.tasks_dir} is not a folder; give the folder holding the task YAMLs")
    manager = _indexed(str(options.tasks_dir) if options.tasks_dir else None)
    known = set(manager.all_tasks)
    for name in options.names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "`lm_eval ls tasks` lists them"
            where = f" or in {options.tasks_dir}" if options.tasks_dir else ""
            raise LowbitError(f"lm-eval has no task {name!r}{where}; {hint} (a local task: --tasks-dir DIR with its YAML)")
    return manager


def load_task_data(options: TaskOptions, manager: Any) -> None:
    """Read every task's dataset now, so a task whose data cannot be reached is refused before the model is loaded
    (the datasets library caches what it read: the evaluation reads it again from that cache)."""
    try:
        manager.load(list(options.names))
    except (OSError, ConnectionError, ValueError) as exc:  # FileNotFoundError, datasets' DatasetNotFoundError, offline
        # the CLI keeps the Hub off unless told otherwise (cli/main.py): say how to let lm-eval download
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" and "offline" in str(exc).lower()
        hub = "set HF_HUB_OFFLINE=0 to let lm-eval download them (lowbit keeps the Hub off by default), or " if offline else ""
        raise LowbitError(
            f"cannot read the data of task(s) {', '.join(options.names)}: {str(exc).splitlines()[0][:200]}; stock "
            f"tasks read their dataset from the Hugging Face Hub (or its local cache): {hub}run a local task "
            "(--tasks-dir DIR, a YAML with dataset_path: json and local data_files; docs/tasks.md)"
        ) from None


def headline_metric(metrics: dict[str, float]) -> str:
    """The metric a results table shows for a task: acc_norm where there is one (lm-eval's length-normalised
    accuracy, the one papers quote for HellaSwag/ARC), else acc, else the first lm-eval reported."""
    for name in PREFERRED:
        if name in metrics:
            return name
    return next(n for n in metrics if not n.endswith("_stderr"))


@dataclass
class TaskScores:
    """Per task: metric -> value (and metric + "_stderr" where lm-eval computed one); the examples scored."""

    scores: dict[str, dict[str, float]]
    examples: dict[str, int]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"tasks": self.scores, "task_examples": self.examples, "task_seconds": round(self.seconds, 2)}


def _flatten(results: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}) as {task: {"acc":
    0.5, "acc_stderr": 0.1}}, keeping the tasks asked for and the subtasks of a group."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        values = {key.split(",")[0]: float(value) for key, value in metrics.items()
                  if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if values:
            scores[task] = values
    missing = [name for name in names if name not in scores]
    if missing:
        raise LowbitError(f"lm-eval returned no scores for {', '.join(missing)}; run the task with lm_eval to see why")
    return scores


def task_scores(model: torch.nn.Module, tokenizer: Any, options: TaskOptions, manager: Any | None = None) -> TaskScores:
    """Run the tasks on an opened model (lowbit.api.open_model): lm-eval's HFLM around the model object itself."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(options)
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(options.names), num_fewshot=options.num_fewshot, limit=options.limit,
        task_manager=manager, log_samples=False, bootstrap_iters=1000,
    )
    seconds = time.perf_counter() - start
    examples = {task: int(n["effective"]) for task, n in (out.get("n-samples") or {}).items()}
    return TaskScores(_flatten(out["results"], options.names), examples, seconds)
