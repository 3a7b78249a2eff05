"""Quantize the shared model with GPTQModel, as its users do (GPTQModel.load -> quantize -> save), in its own
checkpoint formats (GPTQ; AWQ's GEMM layout). Runs in out/peers/venvs/gptqmodel. Settings matched to lowbit's
presets: INT4 asymmetric (sym=False) with the method's groups, lm_head left alone. GPTQ: dampening 0.01,
true-sequential; act-order off means desc_act and GPTQModel's own group-aware reordering (act_group_aware, on by
default) both off; act-order on is desc_act=True. AWQ: GPTQModel's AWQConfig defaults otherwise.
Calibration: the shared token ids, batch size 1.

  usage: python bench/peers/quantize_gptqmodel.py METHOD OUT --model DIR --ids FILE; writes OUT/bench.json
  (METHOD: gptq-w4gG, gptq-w4gG-actorder or awq-w4gG)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from shared import group_of, read_ids, write_json

ACT_ORDER = {  # by the method name's ending
    "": {"desc_act": False, "act_group_aware": False},
    "-actorder": {"desc_act": True, "act_group_aware": False},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("out")
    parser.add_argument("--model", required=True, type=Path, help="the float32 input folder")
    parser.add_argument("--ids", required=True, type=Path, help="a bench/peers/prepare.py ids file")
    args = parser.parse_args()
    if not args.model.is_dir():
        raise SystemExit(f"{args.model} is missing: run bench/peers/prepare.py for this model first")
    ids = read_ids(args.ids)["calibration"]  # [N, L]; checked before the peer's slow imports
    group = group_of(args.method)
    ending = args.method.split(f"g{group}", 1)[-1] if group else None
    awq = args.method == f"awq-w4g{group}"
    if not awq and (not args.method.startswith("gptq-w4g") or ending not in ACT_ORDER):
        raise SystemExit(f"gptqmodel: no recipe for {args.method!r}; pick gptq-w4gG, gptq-w4gG-actorder or awq-w4gG")
    torch.set_num_threads(2)
    start = time.perf_counter()
    # GPTQModel 7.6 sizes its CPU pool as ceil(cores / 2) = 1 here, then asks for 2 model-loader workers from it
    # and raises; two workers is what a 2-core machine has.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import BACKEND, AWQConfig, GPTQModel, QuantizeConfig

    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    if awq:
        config = AWQConfig(bits=4, group_size=group, sym=False)
    else:
        config = QuantizeConfig(bits=4, group_size=group, sym=False, damp_percent=0.01, true_sequential=True,
                                **ACT_ORDER[ending])
    model = GPTQModel.load(str(args.model), config, device="cpu")
    algo_start = time.perf_counter()
    # GPTQModel 7.6 packs AWQ with its CUDA GEMM kernel unless told to use the portable torch one
    model.quantize(calibration, batch_size=1, **({"backend": BACKEND.TORCH} if awq else {}))
    algo_seconds = time.perf_counter() - algo_start
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model.save(str(out))
    write_json(out / "bench.json", {
        "tool": "gptqmodel", "method": args.method, "calibration": list(ids.shape),
        "algorithm_seconds": algo_seconds, "process_seconds_to_saved": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
