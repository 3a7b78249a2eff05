"""Where a gap between lowbit's and llm-compressor's round-to-nearest rows comes from. Both use the same asymmetric
min-max grid; llm-compressor keeps float32 scales and rounds against them, lowbit stores float16 scales (as GPTQ
checkpoints and GGUF do) and rounds against the stored scale. This measures, over every block Linear: the share of
weights whose code differs between the two outputs, each output's relative weight error, and the perplexity of
llm-compressor's own codes with its scales rounded to float16 (the storage alone, codes unchanged), with the shared
evaluator on the shared windows.

  usage: .venv/bin/python bench/peers/rtn_gap.py --model M [--group-size G]   (after run.py's rtn-w4 rows)
  writes bench/results/peers/<M>-g<G>/rtn_gap.json
"""

from __future__ import annotations

import argparse
import json

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lowbit
from shared import REPO, WORK, ids_file, lowbit_perplexity, model_folder, model_name, read_ids, write_json


def llmcompressor_weights(path: str, group: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Linear name -> (codes - zero [out, groups, group], scale [out, groups] float32) of an llm-compressor
    pack-quantized output."""
    found = {}
    with safe_open(path, "pt") as tensors:
        for prefix in sorted({k.rsplit(".", 1)[0] for k in tensors.keys() if k.endswith(".weight_packed")}):
            shape = torch.Size(tensors.get_tensor(f"{prefix}.weight_shape").tolist())  # [out, in]
            scale = tensors.get_tensor(f"{prefix}.weight_scale")
            codes = unpack_from_int32(tensors.get_tensor(f"{prefix}.weight_packed"), 4, shape).float()
            zero = unpack_from_int32(tensors.get_tensor(f"{prefix}.weight_zero_point"), 4,
                                     torch.Size([shape[0], scale.shape[1]]), packed_dim=0).float()
            found[prefix] = (codes.view(shape[0], scale.shape[1], group) - zero[..., None], scale)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = model_name(args.model)
    method = f"rtn-w4g{args.group_size}"
    folder = REPO / "bench" / "results" / "peers" / f"{model}-g{args.group_size}"
    rows = json.loads((folder / "results.json").read_text())["rows"]
    reference = AutoModelForCausalLM.from_pretrained(model_folder(model), dtype=torch.float32).eval()
    ours = lowbit.load(WORK / model / "outputs" / "lowbit" / method, backend="dequantized")
    theirs = llmcompressor_weights(str(WORK / model / "outputs" / "llmcompressor" / method / "model.safetensors"),
                                   args.group_size)
    differing = total = 0
    errors = {"lowbit": [], "llmcompressor": []}
    for name, (shifted, scale) in theirs.items():
        float_weight = reference.get_submodule(name).weight.detach()
        their_weight = (shifted * scale[..., None]).view(float_weight.shape)
        our_weight = ours.get_submodule(name).weight.detach()
        # a code differs where the dequantized weights are over half a step apart
        differing += int(((our_weight - their_weight).view_as(shifted).abs() > scale[..., None] / 2).sum())
        total += float_weight.numel()
        for tool, weight in (("lowbit", our_weight), ("llmcompressor", their_weight)):
            errors[tool].append(float((weight - float_weight).norm() / float_weight.norm()))
        reference.get_submodule(name).weight.data.copy_((shifted * scale.half().float()[..., None]).view_as(float_weight))
    inputs = read_ids(ids_file(model, args.seed))
    result = lowbit_perplexity()(reference, inputs["evaluation"], inputs["window"])
    summary = {
        "model": model, "method": method, "linears": len(theirs),
        "codes_differing_share": round(differing / total, 5),
        "mean_relative_weight_error": {tool: round(sum(e) / len(e), 6) for tool, e in errors.items()},
        "perplexity": {
            "lowbit": round(rows["lowbit"][method]["perplexity"], 3),
            "llmcompressor": round(rows["llmcompressor"][method]["perplexity"], 3),
            "llmcompressor_codes_float16_scales": round(result.perplexity, 3),
        },
    }
    write_json(folder / "rtn_gap.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
