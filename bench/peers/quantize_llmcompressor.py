"""Quantize the shared model with llm-compressor (its `oneshot` entry point), as its users do, and save it in
compressed-tensors form. Runs in out/peers/venvs/llmcompressor. Settings matched to lowbit's presets: INT4
asymmetric with the method's groups (W4A16_ASYM at gG), lm_head left alone, GPTQ block 128 and dampening 0.01,
act-order as llm-compressor 0.14 offers it ("weight": columns visited by descending H_jj, groups kept in the
original column order; "group" is no longer accepted), SmoothQuant a=0.5 with INT8 per-channel weights and
dynamic per-token INT8 inputs (scheme W8A8); everything else at llm-compressor's defaults. Calibration: the
shared token ids, in order, batch size 1 (oneshot's default).

  usage: python bench/peers/quantize_llmcompressor.py METHOD OUT --model DIR --ids FILE; writes OUT/bench.json
  (METHOD as bench/peers/run.py names it: gptq-w4g128, smoothquant-w8a8, ...)
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

import torch

from shared import group_of, read_ids, write_json



def w4(group: int | None) -> dict:
    return {"ignore": ["lm_head"], "config_groups": {"w4": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": group, "symmetric": False,
    }}}}


def recipe(method: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform import AWQModifier

    prune = {"targets": ["Linear"], "ignore": ["lm_head"], "sparsity": 0.5}
    W4 = w4(group_of(method))
    recipes = {
        "rtn-w4": lambda: [QuantizationModifier(**W4)],
        "gptq-w4": lambda: [GPTQModifier(**W4, actorder=None, block_size=128, dampening_frac=0.01)],
        "gptq-w4-actorder": lambda: [GPTQModifier(**W4, actorder="weight", block_size=128, dampening_frac=0.01)],
        "awq-w4": lambda: [AWQModifier(), QuantizationModifier(**W4)],
        "smoothquant-w8a8": lambda: [
            SmoothQuantModifier(smoothing_strength=0.5),
            QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ],
        "wanda-50": lambda: [WandaPruningModifier(**prune, mask_structure="0:0")],
        "wanda-2of4": lambda: [WandaPruningModifier(**prune, mask_structure="2:4")],
        "sparsegpt-50": lambda: [SparseGPTModifier(**prune, mask_structure="0:0")],
    }
    template = re.sub(r"-w4g\d+", "-w4", method)
    if template not in recipes or (template.startswith(("rtn-", "gptq-", "awq-")) and group_of(method) is None):
        raise SystemExit(f"llm-compressor: no recipe for {method!r}; pick from {', '.join(recipes)} "
                         "(w4 methods with their group size: gptq-w4g128)")
    return recipes[template]()


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
    torch.set_num_threads(2)
    start = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (a speed-up for copying them to a GPU) and pinning
        # raises without an accelerator; on a CPU-only machine it has nothing to speed up, so skip it.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    n, length = ids.shape
    data_free = args.method.startswith("rtn-")  # weight-only RTN reads no calibration inputs
    dataset = None if data_free else Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    mods = recipe(args.method)
    algo_start = time.perf_counter()
    oneshot(
        model=model, recipe=mods, dataset=dataset, num_calibration_samples=n, max_seq_length=length,
        shuffle_calibration_samples=False,
    )
    algo_seconds = time.perf_counter() - algo_start
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    write_json(out / "bench.json", {
        "tool": "llmcompressor", "method": args.method, "calibration": [n, length] if dataset is not None else None,
        "algorithm_seconds": algo_seconds, "process_seconds_to_saved": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
