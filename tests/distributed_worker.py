"""What each rank of tests/test_distributed.py runs: a gloo process group of two CPU processes (one thread each),
the same lowbit call on every rank, and each rank's outcome written to a file the test reads (an exception in a
spawned process would otherwise only surface as a traceback)."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit.api import quantize, quantize_checkpoint
from lowbit.distributed.ranks import current_ranks
from lowbit.errors import LowbitError
from lowbit.presets import resolve_recipe
from lowbit.recipe import AWQ, GPTQ, ActQuant, Recipe, RTN, SmoothQuant, WeightQuant
from toy import calibration, toy_model

BATCH = 2
W8_CHANNEL = WeightQuant(bits=8, symmetric=True, granularity="channel")
# recipes whose sampling and replay bounds bite on a toy calibration set: AWQ replays 4 of 12 sequences and samples
# 32 of 288 clip rows, so the recorded calls and the token sample span ranks
CUSTOM = {
    "awq-sampled": Recipe((AWQ(WeightQuant(group_size=32), replay_sequences=4, clip_tokens=32),)),
    "awq-gptq-sampled": Recipe((AWQ(WeightQuant(group_size=32), replay_sequences=4, clip_tokens=32),
                                GPTQ(WeightQuant(group_size=32)))),
    "smoothquant-static": Recipe((SmoothQuant(fold_into_linears=True), RTN(W8_CHANNEL), ActQuant(granularity="tensor", dynamic=False))),
}


def quantized_state(model_type: str, recipe: str, seed: int = 0, calibration_seed: int = 0, n_sequences: int = 8,
                    batch_size: int = BATCH) -> dict:
    """The state dict and per-block errors of a toy model quantized with ``recipe`` (on whatever ranks run it)."""
    model = toy_model(model_type, seed=seed)
    quantize(model, CUSTOM.get(recipe) or resolve_recipe(recipe), calibration(n_sequences, 24, seed=calibration_seed),
             batch_size=batch_size, ranks=current_ranks("cpu"))
    report = model.lowbit_info.report
    with torch.no_grad():
        logits = model(calibration(2, 24, seed=7)).logits
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "block_errors": [b.rel_error for b in report.blocks], "logits": logits,
            "linear_errors": [r.rel_error for b in report.blocks for r in b.linears]}


def run(rank: int, world: int, rendezvous: str, scenario: str, folder: str, payload: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a deadlock fails the test instead of hanging it
    outcome: dict = {"ok": True}
    try:
        if scenario == "methods":
            results = {f"{m}/{r}": quantized_state(m, r, **payload.get("options", {})) for m, r in payload["runs"]}
            if rank == 0:
                torch.save(results, Path(folder) / "results.pt")
        elif scenario == "mismatch":
            quantized_state("llama", "gptq-w4g128", **payload[str(rank)])
        elif scenario == "failure":
            if rank == 1:  # this rank fails on its second block, after the others started it
                import lowbit.pipeline.compress as compress

                real = compress._compress_linear

                def failing(ctx, path, *rest):  # noqa: ANN001, ANN002, ANN202
                    if ctx.prefix.endswith(".1"):
                        raise LowbitError("injected failure on rank 1; nothing to fix")
                    return real(ctx, path, *rest)

                compress._compress_linear = failing
            quantize_checkpoint(Path(payload["source"]), resolve_recipe("gptq-w4g128"), calibration(8, 24),
                                Path(payload["out"]), batch_size=BATCH, progress=False, ranks=current_ranks("cpu"))
    except LowbitError as exc:
        outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 (the test reports anything else as a failure)
        outcome = {"ok": False, "type": type(exc).__name__, "message": traceback.format_exc()}
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(outcome))
    if outcome["ok"]:
        dist.destroy_process_group()
    else:  # a group whose peer is gone aborts in its destructor at exit (SIGABRT); the outcome is written
        os._exit(0)
