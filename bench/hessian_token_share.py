"""How much of each Linear's GPTQ Hessian H = 2 X^T X comes from each sequence's first position and from the top 1%
of tokens, on the embedded SmolLM2-135M (full precision, block by block).

A token's share of trace(H) is its squared input norm over the sum of all of them. Where a few tokens dominate, GPTQ
fits the rounding to those tokens. Prints a table and writes bench/results/hessian_token_share.json.

    .venv/bin/python bench/hessian_token_share.py [--nsamples 8 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lowbit.data.calibration import calibration_ids
from lowbit.data.text import documents
from lowbit.models.lazy import LazyModel
from lowbit.models.tokenizer import load_tokenizer
from lowbit.models.source import resolve_model
from lowbit.pipeline.capture import capture_block_calls, run_block

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)

RESULTS = Path(__file__).resolve().parent / "results" / "hessian_token_share.json"
INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # q/k/v and gate/up share inputs


def token_shares(x: torch.Tensor) -> dict[str, float]:
    """x [batch, seq, in] -> share of trace(X^T X) from position 0 and from the top 1% of tokens."""
    sq = x.float().pow(2).sum(-1)  # [batch, seq]
    top = sq.flatten().topk(max(1, sq.numel() // 100)).values
    return {"position0": float(sq[:, 0].sum() / sq.sum()), "top1pct": float(top.sum() / sq.sum())}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    source = resolve_model("smollm2-135m").folder
    lazy = LazyModel(source)
    ids = calibration_ids(load_tokenizer(source), documents("wiki", "calibration"), args.nsamples, args.seq_len)
    lazy.materialize_outside_blocks()
    calls = capture_block_calls(lazy.model, lazy.blocks, ids, args.nsamples, "cpu")  # one batch
    hidden = calls.hidden[0]
    rows = []
    for i in range(len(lazy.blocks)):
        prefix = f"{lazy.arch.blocks}.{i}"
        lazy.materialize(prefix)
        block = lazy.blocks[i]
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            block.get_submodule(p).register_forward_pre_hook(lambda _m, a, p=p: seen.__setitem__(p, a[0]))
            for p in INPUTS
        ]
        try:
            hidden = run_block(block, hidden, calls.calls[i][0])
        finally:
            for hook in hooks:
                hook.remove()
        rows += [{"block": i, "input_of": p, **token_shares(seen[p])} for p in INPUTS]
        lazy.release(prefix)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"calibration": f"{args.nsamples} x {args.seq_len}", "rows": rows}, indent=2))
    print(f"share of trace(H) per Linear input, {args.nsamples} x {args.seq_len} calibration tokens\n")
    print("| block | input of | position 0 | top 1% of tokens |")
    print("|---:|---|---:|---:|")
    for r in rows:
        if r["position0"] > 0.05 or r["top1pct"] > 0.2:
            print(f"| {r['block']} | {r['input_of']} | {r['position0']:.0%} | {r['top1pct']:.0%} |")
    print(f"\n(rows where position 0 > 5% or the top 1% > 20%; every row in {RESULTS.name})")


if __name__ == "__main__":
    main()
