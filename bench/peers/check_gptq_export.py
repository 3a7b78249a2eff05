"""lowbit's GPTQ checkpoint export (`--format gptq`) read back by GPTQModel, in GPTQModel's own environment.

Per grid: lowbit quantizes the peer benchmark's SmolLM2-135M folder with `lowbit quantize --format gptq` and saves
its own dequantized weights rounded to float16 (the dtype GPTQModel's CPU kernel dequantizes in) and the float32
logits of its model with those weights on two evaluation sequences; then GPTQModel.load reads the export. Checked:
every quantized Linear's weight as GPTQModel dequantizes it equals lowbit's exactly, and the float32 logits of
GPTQModel's model (its weights in float32 Linears, as bench/peers/evaluate.py evaluates GPTQModel's outputs) equal
lowbit's with every parameter rounded to float16 as GPTQModel loads them, up to the environments' summation order.

  usage: .venv/bin/python bench/peers/check_gptq_export.py write          (lowbit's venv; after prepare.py)
         out/peers/venvs/gptqmodel/bin/python bench/peers/check_gptq_export.py read    (after setup.sh gptqmodel)
  writes bench/results/peers/gptq_export_check.json and prints a table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from shared import REPO, WORK, ids_file, model_folder, read_ids, swap_for_float_linear

FOLDER = WORK / "gptq-check"
RESULTS = REPO / "bench" / "results" / "peers" / "gptq_export_check.json"
MODEL = "smollm2-135m"
# name -> the GPTQ/RTN step (JSON recipe form); RTN where the grid, not the method, is what is checked
CASES = {
    "gptq-w4-asym-g64": {"type": "gptq", "bits": 4, "symmetric": False, "granularity": "group", "group_size": 64},
    "gptq-w4-asym-g64-desc-act": {"type": "gptq", "bits": 4, "symmetric": False, "granularity": "group",
                                  "group_size": 64, "act_order": True, "static_groups": False},
    "rtn-w4-sym-g128": {"type": "rtn", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 128},
    "rtn-w3-asym-g64": {"type": "rtn", "bits": 3, "symmetric": False, "granularity": "group", "group_size": 64},
    "rtn-w2-asym-g64": {"type": "rtn", "bits": 2, "symmetric": False, "granularity": "group", "group_size": 64},
    "rtn-w8-sym-channel": {"type": "rtn", "bits": 8, "symmetric": True, "granularity": "channel"},
}


def sample_ids() -> torch.Tensor:
    """Two sequences of 128 evaluation tokens [2, 128]."""
    return read_ids(ids_file(MODEL, 0))["evaluation"].reshape(-1)[: 2 * 128].reshape(2, 128)


def write() -> None:
    """lowbit's side: quantize, export, and save lowbit's weights and logits per case."""
    import lowbit
    from lowbit.runtime.weight_only import WeightOnlyLinear
    from safetensors.torch import save_file

    for name, step in CASES.items():
        out = FOLDER / name
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe = out.parent / f"{name}.json"
        recipe.write_text(json.dumps({"name": name, "steps": [step], "ignore": ["lm_head"]}))
        command = [str(REPO / ".venv" / "bin" / "lowbit"), "--quiet", "quantize", "--model", str(model_folder(MODEL)),
                   "--recipe", str(recipe), "--nsamples", "8", "--seq-len", "256", "--format", "gptq",
                   "--out", str(out), "--overwrite", "--json"]
        subprocess.run(command, check=True, capture_output=True)
        model = lowbit.load(out)
        weights = {n: m.dequantized_weight().half() for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
        save_file(weights, out / "lowbit_weights_fp16.safetensors")
        for module_name, weight in weights.items():  # the same float16-rounded weights in float32 Linears
            swap_for_float_linear(model, module_name, weight)
        for parameter in model.parameters():  # GPTQModel loads every other tensor in float16 too
            parameter.data = parameter.data.half().float()
        with torch.no_grad():
            torch.save(model(sample_ids()).logits.float(), out / "lowbit_logits.pt")
        print(f"{name}: {len(weights)} Linears exported to {out / 'gptq'}", flush=True)


def read() -> None:
    """GPTQModel's side: load each export, compare weights and logits, write the results."""
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file

    from evaluate import gptqmodel_to_float

    torch.set_num_threads(2)
    results = {}
    for name in CASES:
        out = FOLDER / name
        config = json.loads((out / "gptq" / "quantize_config.json").read_text())
        theirs = GPTQModel.load(str(out / "gptq"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
        ours = load_file(out / "lowbit_weights_fp16.safetensors")
        weights = gptqmodel_to_float(theirs)  # float32 of GPTQModel's float16 dequantization, by module
        compared = len(weights)
        equal = sum(bool(torch.equal(w.half(), ours[n])) for n, w in weights.items())
        with torch.no_grad():
            logits = theirs.float().eval()(sample_ids()).logits
        reference = torch.load(out / "lowbit_logits.pt")
        results[name] = {
            "checkpoint_format": config["checkpoint_format"], "bits": config["bits"],
            "group_size": config["group_size"], "sym": config["sym"], "desc_act": config["desc_act"],
            "linears": len(ours), "linears_read": compared, "weights_equal": equal,
            "logits_max_abs_diff": float((logits - reference).abs().max()),
            "logits_max_abs": float(reference.abs().max()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        }
        print(name, results[name], flush=True)
    RESULTS.write_text(json.dumps({"model": MODEL, "gptqmodel": version(), "cases": results}, indent=2) + "\n")
    print("| case | format | Linears read / exported | weights equal | max abs logit diff (of max) | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['checkpoint_format']} | {r['linears_read']} / {r['linears']} | {r['weights_equal']} | "
              f"{r['logits_max_abs_diff']:.2e} ({r['logits_max_abs']:.1f}) | {r['top1_agreement']:.3f} |")


def version() -> str:
    from importlib.metadata import version as installed

    return installed("gptqmodel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=("write", "read"))
    args = parser.parse_args()
    if not model_folder(MODEL).is_dir():
        sys.exit(f"{model_folder(MODEL)} is missing: run `.venv/bin/python bench/peers/prepare.py` first")
    write() if args.side == "write" else read()


if __name__ == "__main__":
    main()
