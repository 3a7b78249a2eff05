"""Why GPTQ's act-order can lose: per-Linear loss on calibration tokens against held-out tokens.

For chosen Linears of the float model: H_cal from the peer benchmark's calibration ids of seed 0 and H_held from
those of seed 1 (other sequences of the same text, same count), both 2 X^T X / n of the Linear's float inputs. Each
GPTQ variant (bench/peers/actorder.py: column, desc, weight; W4 asymmetric, groups of --group-size, damping 0.01)
is fitted on H_cal, with the off-diagonal of H_cal shrunk by each --shrink, and scored by the proxy loss
tr(dW H dW^T) / tr(W H W^T) (dW = W_hat - W, the Linear's relative output error on those tokens) under H_cal
("fit") and under H_held ("held-out"), and under the held-out Hessian of every position but each sequence's first
("held-out, ordinary tokens": the attention-sink position carries most of X^T X in these models, so it decides the
first two). RTN is scored the same way. A variant that lowers the fit loss but raises the held-out loss is fitting
the calibration set's noise.

Writes bench/results/peers/actorder_layers-<model>.json and prints a table (losses x 1000).

  usage: .venv/bin/python bench/peers/actorder_layers.py --model qwen2.5-coder-0.5b --blocks 3 12
             [--linears mlp.down_proj self_attn.o_proj self_attn.q_proj] [--shrink 0 0.05 0.1 0.2 0.4]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from actorder import VARIANTS as ALL_VARIANTS
from shared import REPO, model_folder, model_name, shared_inputs

sys.path.insert(0, str(REPO / "src"))
from lowbit.methods.base import WeightQuant  # noqa: E402
from lowbit.numerics.obs import obs_compress  # noqa: E402
from lowbit.numerics.rtn import rtn  # noqa: E402

RESULTS = REPO / "bench" / "results" / "peers"
VARIANTS = {v: ALL_VARIANTS[v] for v in ("column", "desc", "weight")}  # shrink is swept here, not a variant


@torch.no_grad()
def hessians(model: torch.nn.Module, targets: dict[str, torch.nn.Linear], ids: torch.Tensor, last: int,
              skip_first: int = 0) -> dict:
    """2 X^T X / n of each target's inputs over the sequences ``ids`` [N, L] without their first ``skip_first``
    positions, the model cut after block ``last``."""
    sums = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in targets.items()}
    tokens = 0

    def hook(key: str):
        def take(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0][:, skip_first:].reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            sums[key].addmm_(x.T, x)
        return take

    handles = [m.register_forward_hook(hook(k)) for k, m in targets.items()]
    layers = model.model.layers
    model.model.layers = layers[: last + 1]  # later blocks feed no target
    try:
        for row in ids:
            model.model(row[None])
            tokens += row.numel() - skip_first
    finally:
        model.model.layers = layers
        for handle in handles:
            handle.remove()
    return {k: (2 * s / tokens).float() for k, s in sums.items()}


def relative_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) for W, W_hat [out, in], H [in, in]."""
    d, W, H = (W_hat - W).double(), W.double(), H.double()
    return float(torch.einsum("oi,ij,oj->", d, H, d) / torch.einsum("oi,ij,oj->", W, H, W))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 12])
    parser.add_argument("--linears", nargs="+", default=["mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj"])
    parser.add_argument("--shrink", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    name = model_name(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_folder(name), dtype=torch.float32).eval()
    targets = {f"{b}.{path}": model.model.layers[b].get_submodule(path) for b in args.blocks for path in args.linears}
    fit = hessians(model, targets, shared_inputs(name, 0)["calibration"], max(args.blocks))
    held_ids = shared_inputs(name, 1)["calibration"]
    held = hessians(model, targets, held_ids, max(args.blocks))
    ordinary = hessians(model, targets, held_ids, max(args.blocks), skip_first=1)
    spec = WeightQuant(bits=4, symmetric=False, granularity="group", group_size=args.group_size)
    rows = []
    for key, module in targets.items():
        W = module.weight.detach().float()
        def losses(W_hat: torch.Tensor) -> list[float]:
            return [relative_loss(W, W_hat, H[key]) for H in (fit, held, ordinary)]

        row = {"linear": key, "rtn": losses(rtn(W, spec).dequantize())}
        for shrink in args.shrink:
            for variant, options in VARIANTS.items():
                row[f"{variant} shrink {shrink:g}"] = losses(obs_compress(W, fit[key], spec, shrink=shrink,
                                                                          **options).weight)
        rows.append(row)
        print(f"{key}: " + ", ".join(f"{k} " + "/".join(f"{x * 1e3:.3f}" for x in v) for k, v in row.items()
                                     if k != "linear"), flush=True)
    (RESULTS / f"actorder_layers-{name}.json").write_text(json.dumps({"model": name, "group_size": args.group_size, "rows": rows}, indent=2) + "\n")
    columns = ["rtn"] + [f"{v} shrink {s:g}" for s in args.shrink for v in VARIANTS]
    print(f"\n{name}, W4 g{args.group_size}: fit / held-out / held-out ordinary tokens, loss x 1000\n")
    print("| Linear | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for row in rows:
        print(f"| {row['linear']} | " + " | ".join(" / ".join(f"{x * 1e3:.3f}" for x in row[c]) for c in columns)
              + " |")


if __name__ == "__main__":
    main()
