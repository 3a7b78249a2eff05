"""Perplexity of one tool's output with lowbit's evaluator, on the shared evaluation windows. Runs in the tool's
own environment, loading the output the way that tool's users would (lowbit.load; transformers + compressed-tensors
for llm-compressor; GPTQModel.load), then calls the same perplexity function on the same token ids.

  usage: python bench/peers/evaluate.py TOOL DIR --ids FILE   (TOOL: fp32, lowbit, llmcompressor, gptqmodel; FILE:
         out/peers/<model>/ids-seed<S>.pt, whose evaluation windows are the same for every seed); prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from shared import lowbit_perplexity, read_ids, swap_for_float_linear

os.environ.setdefault("LOWBIT_GGUF_DTYPE", "float32")  # the GGUF's exact weights, as published (docs/gguf_import.md)


def open_model(tool: str, path: str) -> torch.nn.Module:
    if tool == "lowbit":
        import lowbit

        return lowbit.load(path)
    if tool in ("fp32", "llmcompressor"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if tool == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        # GPTQModel's CPU kernel runs only in float16/bfloat16; to evaluate its weights in float32 like every other
        # row, each quantized Linear becomes an nn.Linear holding its dequantized weight (float16 dequantization:
        # exact for 4-bit codes times float16 scales up to float16 rounding).
        model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
        gptqmodel_to_float(model)
        return model.float().eval()
    raise SystemExit(f"unknown tool {tool!r}")


def gptqmodel_weight(module: torch.nn.Module) -> torch.Tensor:
    """A GPTQModel quantized Linear's weight [out, in] in float32: GPTQ modules dequantize themselves, AWQ's GEMM
    modules through AWQ's unpacking (both layouts are [in, out])."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight().T.float()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales, bits=module.bits,
                           group_size=module.group_size).T.float()


def gptqmodel_to_float(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every GPTQModel quantized Linear of ``model`` becomes a float32 nn.Linear of its dequantized weight; returns
    those weights [out, in] by module name."""
    quantized = [n for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "qzeros")]
    weights = {name: gptqmodel_weight(model.get_submodule(name)) for name in quantized}
    for name, weight in weights.items():
        swap_for_float_linear(model, name, weight)
    return weights


def block_weight_zero_share(model: torch.nn.Module) -> float:
    """Share of exactly-zero weights over the decoder blocks' Linears (after evaluation, so compressed-tensors
    models are decompressed): ~0.5 proves a 50% pruning reached the evaluated model."""
    zeros = total = 0
    for name, module in model.named_modules():
        if ".layers." not in name:
            continue
        if hasattr(module, "dense_weight"):
            weight = module.dense_weight()
        elif hasattr(module, "dequantized_weight"):
            weight = module.dequantized_weight()
        elif isinstance(module, torch.nn.Linear) and module.weight.is_floating_point():
            weight = module.weight
        else:
            continue
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool")
    parser.add_argument("path", help="the folder the tool wrote (the float32 input folder for fp32)")
    parser.add_argument("--ids", required=True, type=Path, help="a bench/peers/prepare.py ids file")
    args = parser.parse_args()
    if not Path(args.path).is_dir():
        raise SystemExit(f"{args.path} is not a folder; pass the output folder the tool wrote")
    torch.set_num_threads(2)
    inputs = read_ids(args.ids)
    start = time.perf_counter()
    model = open_model(args.tool, args.path)
    load_seconds = time.perf_counter() - start
    perplexity = lowbit_perplexity()
    result = perplexity(model, inputs["evaluation"], inputs["window"])
    print(json.dumps({
        "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
        "eval_seconds": result.seconds, "load_seconds": load_seconds, "evaluation_sha": inputs["evaluation_sha"],
        "zero_share": block_weight_zero_share(model),
    }))


if __name__ == "__main__":
    main()
