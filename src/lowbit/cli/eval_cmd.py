"""`lowbit eval`: perplexity on held-out text, bytes on disk and in memory, load time of one model, and with
--tasks its lm-evaluation-harness task accuracy."""

from __future__ import annotations

import argparse
import json

from lowbit.cli.common import (
    add_eval_options, add_model_options, add_task_options, console, parse_device, task_options, torch_dtype,
)
from lowbit.evaluation.units import mib


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="perplexity, task accuracy (lm-eval), bytes on disk and load time of a model")
    e.add_argument("model", help="HF folder, .gguf file, lowbit output directory, or 'smollm2-135m'")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(e)
    add_eval_options(e)
    add_task_options(e)
    e.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from lowbit.evaluation.evaluate import evaluate

    ev = evaluate(
        args.model, args.data, args.window, args.max_windows or None, torch_dtype(args.dtype), parse_device(args.device),
        progress=not args.json, tasks=task_options(args),
    )
    if args.json:
        print(json.dumps({"model": args.model, **ev.summary()}, indent=2))
        return 0
    p = ev.perplexity
    console.print(
        f"[bold]{args.model}[/bold]: perplexity {p.perplexity:.3f} (GPTQ protocol: {p.windows} non-overlapping "
        f"windows of {p.seq_len} tokens, {p.tokens} predicted tokens), {mib(ev.disk_bytes)} parameters on disk, "
        f"{mib(ev.memory_bytes)} in memory, loaded in {ev.load_seconds:.2f}s, evaluated in {p.seconds:.1f}s"
    )
    if ev.tasks:
        for task, metrics in ev.tasks.scores.items():
            values = ", ".join(f"{name} {value:.4f}" + (f" ± {metrics[name + '_stderr']:.4f}"
                                                         if name + "_stderr" in metrics else "")
                               for name, value in metrics.items() if not name.endswith("_stderr"))
            console.print(f"  {task} ({ev.tasks.examples.get(task, '?')} examples): {values}")
        console.print(f"  tasks run by lm-eval in {ev.tasks.seconds:.1f}s")
    return 0
