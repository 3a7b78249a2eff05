"""Export a lowbit checkpoint as compressed-tensors (the format vLLM and transformers load): weight-only INT2..INT8
Linears as ``pack-quantized`` with the recipe's group size, W8A8-style Linears (quantized weights and symmetric
integer inputs, per token or per tensor) as ``int-quantized``, float grids (FP8, NVFP4, MXFP4) as compressed-tensors'
float formats (compressed_tensors_float.py), everything else as it is, and ``quantization_config`` in config.json.

Per weight-only Linear (compressed-tensors names, lowbit's integer codes unchanged):
  weight_packed     int32 [out, ceil(in * bits / 32)]   signed codes q = code - 2**(bits-1), packed densely
  weight_scale      [out, n_groups]                     lowbit's float16 scales, in the model's dtype
  weight_zero_point int32 (asymmetric only)             zero - 2**(bits-1), packed along the output dimension
  weight_shape      int64 [2]
so (q - zero_point) * scale is lowbit's (code - zero) * scale exactly. Packing uses compressed-tensors' own
``pack_to_int32`` so the bit layout is the reader's by construction.

Per Linear that also quantizes its inputs (``int-quantized``: one signed code per int8):
  weight            int8 [out, in]                      q = code - 2**(bits-1)
  weight_scale      [out, n_groups]; weight_zero_point int8 [out, n_groups] (asymmetric only)
  input_scale       float32 [1]                         static per-tensor input scale only (dynamic: none)
The input grid differs in one detail: lowbit's (and vLLM's) dynamic scale is absmax / 127, compressed-tensors'
reference fake-quantization divides by 127.5, so its logits agree with lowbit's closely, not bit for bit.

Pruned (not quantized) Linears are written as their dense ``weight``, zeros included. compressed-tensors removed
its sparse storage formats (sparse-bitmask, sparse-24-bitmask, marlin-24) in 0.15 (vllm-project/compressed-tensors
#610), and llm-compressor now saves pruned models dense too; a pruning-only recipe therefore gives a plain dense
checkpoint with no ``quantization_config``, which vLLM and transformers load as any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.preset_names import SWEEP_NAME
from lowbit.export.compressed_tensors_float import float_module_tensors, float_scheme
from lowbit.export.hf_folder import write_hf_folder
from lowbit.models.checkpoint_names import hub_module_name, hub_tensor_name
from lowbit.models.experts import is_router
from lowbit.numerics.qweight import QWeight
from lowbit.methods.act_quant import ASYMMETRIC_INPUTS
from lowbit.recipe import Recipe
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.float_linear import FloatQuantLinear
from lowbit.runtime.kquant_linear import KQuantLinear, k_grid_refusal
from lowbit.runtime.llm_int8 import Int8OutlierLinear
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from lowbit.runtime.rotated_input import refuse_online_rotations

CT_FORMAT = "pack-quantized"  # weight-only Linears
CT_ACT_FORMAT = "int-quantized"  # Linears that quantize their inputs too
CT_DIR = "compressed-tensors"  # where `lowbit quantize --format compressed-tensors` puts it, inside the output


def _pack_to_int32():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise LowbitError("compressed-tensors export needs the `compressed-tensors` package: pip install 'lowbit[export]'") from None
    return pack_to_int32


def asymmetric_weights_refusal(recipe_name: str | None = None) -> LowbitError:
    """Asymmetric pack-quantized checkpoints decompress exactly with compressed-tensors' own decompressor, but
    transformers cannot load them (checked with transformers 5.23 and compressed-tensors 0.20: it builds the zero
    point [out, groups] unpacked and refuses the packed [out * bits / 32, groups] tensor as a size mismatch).
    Written anyway they would be a checkpoint its main reader rejects, so they are refused with the way out."""
    sym = f"{recipe_name}-sym" if recipe_name and SWEEP_NAME.fullmatch(f"{recipe_name}-sym") else "gptq-w4g128-sym"
    return LowbitError(
        "asymmetric weight grids in compressed-tensors do not load in transformers (checked: transformers 5.23 with "
        "compressed-tensors 0.20 rejects the packed zero point as a size mismatch); quantize on a symmetric grid for "
        f"this format (e.g. --recipe {sym}, or \"symmetric\": true in a recipe file), or export --format gptq, which "
        "holds asymmetric grids"
    )


def check_recipe_for_compressed_tensors(recipe: Recipe) -> None:
    """Refuse, before any quantization work, a recipe whose output this exporter cannot write (or its readers
    cannot load)."""
    recipe.check_export("compressed-tensors")
    step = recipe.weight_step
    grids = [getattr(step, "grid", None), *recipe.plan.values()]  # a plan's grids too (written by hand, any symmetry)
    if any(g is not None and not g.symmetric for g in grids) and not recipe.quantizes_inputs:
        raise asymmetric_weights_refusal(recipe.name)
    if any(g.granularity == "tensor" for g in recipe.plan.values()):
        raise LowbitError("per-tensor weight grids are not exported to compressed-tensors; this recipe's plan has "
                          "one: plan per-channel or per-group grids")


def _check_activations(symmetric: bool) -> None:
    if not symmetric:
        raise LowbitError(ASYMMETRIC_INPUTS)


def weight_scheme(qweight: QWeight) -> dict[str, Any]:
    """The compressed-tensors ``weights`` arguments of one QWeight's grid."""
    if not qweight.groups_in_order:
        # compressed-tensors names the tensor (weight_g_idx, actorder "group"), but 0.20's decompressor, the one
        # transformers loads with, never reads it: such a checkpoint would load with scrambled groups
        raise LowbitError("act-order groups with a g_idx (GPTQ act_order with static_groups=False) are not exported to "
                          "compressed-tensors: its decompressor (0.20) ignores weight_g_idx; quantize with "
                          "static_groups=True (the -actorder presets' default), or export --format gptq")
    if qweight.scale.shape[0] == 1 and qweight.out_features > 1:
        raise LowbitError("per-tensor weight grids are not exported to compressed-tensors; use per-channel or per-group")
    grouped = qweight.scale.shape[1] > 1
    return {
        "num_bits": qweight.bits, "type": "int", "symmetric": qweight.symmetric,
        "strategy": "group" if grouped else "channel", "group_size": qweight.group_size if grouped else None,
        "dynamic": False, "actorder": None, "observer": "minmax",
    }


def activation_scheme(module: ActQuantLinear) -> dict[str, Any]:
    """The compressed-tensors ``input_activations`` arguments of a Linear that quantizes its inputs."""
    _check_activations(module.act_symmetric)
    return {
        "num_bits": module.act_bits, "type": "int", "symmetric": True,
        "strategy": "token" if module.act_per_token else "tensor", "group_size": None,
        "dynamic": not module.act_static, "actorder": None, "observer": "minmax" if module.act_static else None,
    }


def int_quantized_module(module: ActQuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One W8A8-style Linear's ``int-quantized`` tensors (local names): its codes unpacked, one per int8."""
    qweight = module.unpacked()
    offset = 1 << (qweight.bits - 1)
    tensors = {
        "weight": (qweight.codes.to(torch.int16) - offset).to(torch.int8),
        "weight_scale": qweight.scale.to(dtype),
    }
    if qweight.zero is not None:
        tensors["weight_zero_point"] = (qweight.zero.to(torch.int16) - offset).to(torch.int8)
    if module.act_static:
        tensors["input_scale"] = module.input_scale.reshape(1).float()
    return tensors


def compressed_module(qweight: QWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One weight-only Linear's ``pack-quantized`` tensors (local names)."""
    pack = _pack_to_int32()
    offset = 1 << (qweight.bits - 1)
    tensors = {
        "weight_packed": pack((qweight.codes.to(torch.int16) - offset).to(torch.int8), qweight.bits),
        "weight_scale": qweight.scale.to(dtype),
        "weight_shape": torch.tensor(qweight.codes.shape),
    }
    if qweight.zero is not None:
        tensors["weight_zero_point"] = pack((qweight.zero.to(torch.int16) - offset).to(torch.int8), qweight.bits, packed_dim=0)
    return tensors


def _integer_group(module: WeightOnlyLinear, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config group, tensors) of an integer Linear: pack-quantized, or int-quantized where it quantizes its inputs."""
    qweight = module.unpacked()
    acts = activation_scheme(module) if isinstance(module, ActQuantLinear) else None
    group = {"targets": [], "weights": weight_scheme(qweight), "input_activations": acts,
             "output_activations": None, "format": CT_FORMAT if acts is None else CT_ACT_FORMAT}
    tensors = compressed_module(qweight, dtype) if acts is None else int_quantized_module(module, dtype)
    return group, tensors


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, quantization_config) of a lowbit-loaded model; a pure function of the model. The config is None
    when no Linear is quantized (a pruning-only recipe: dense weights, see the module docstring)."""
    dtype = model.get_input_embeddings().weight.dtype
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}  # scheme as JSON -> its config group
    written: set[str] = set()  # Linears whose tensors are already in ``state``
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            state[f"{name}.weight"] = module.dense_weight()
        elif isinstance(module, WeightOnlyLinear):
            if isinstance(module, Int8OutlierLinear):
                raise LowbitError(f"{name} is LLM.int8() (outlier columns in float), which compressed-tensors cannot hold")
            if isinstance(module, FloatQuantLinear):  # FP8, NVFP4, MXFP4: compressed_tensors_float.py
                group, tensors = {"targets": [], **float_scheme(module)}, float_module_tensors(module)
            else:
                group, tensors = _integer_group(module, dtype)
            key = json.dumps({k: v for k, v in group.items() if k != "targets"}, sort_keys=True)
            groups.setdefault(key, group)["targets"].append(name)
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
        else:
            continue
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
        written.add(name)
    if not written:
        raise LowbitError("no quantized or pruned Linear found: export a lowbit output directory made by `lowbit quantize`")
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in written and "rotary_emb" not in name:
            state.setdefault(name, tensor)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    # mixture-of-experts tensors under the hub's names (vLLM reads Mixtral's experts as block_sparse_moe.experts.3.w1)
    model_type = model.config.model_type
    state = {hub_tensor_name(model_type, k): v.detach().contiguous() for k, v in state.items()}
    if not groups:
        return state, None
    quantized = {t for g in groups.values() for t in g["targets"]}
    for g in groups.values():
        g["targets"] = [hub_module_name(model_type, t) for t in g["targets"]]
    # routers stay float (models/experts.py): listed so that a reader targeting "Linear" leaves them alone
    plain = [
        hub_module_name(model_type, n) for n, m in model.named_modules()
        if (isinstance(m, (nn.Linear, SparseLinear)) or is_router(m)) and n not in quantized
    ]
    config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
    if len(config_groups) == 1:  # the usual case: one scheme for every quantized Linear
        config_groups["group_0"]["targets"] = ["Linear"]
    formats = {g["format"] for g in config_groups.values()}
    quantization_config = {
        "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": plain, "kv_cache_scheme": None,
    }
    return state, quantization_config


def write_compressed_tensors(
    folder: Path, model: nn.Module, out: Path, overwrite: bool = False
) -> dict[str, Any] | None:
    """Write the export of ``model`` (loaded from lowbit output ``folder``) to directory ``out``, atomically.
    Returns its quantization_config (None: a pruning-only model, written dense)."""
    refuse_online_rotations(model, "compressed-tensors")
    # refused before any packing: llama.cpp's grids, and weight-only Linears (pack-quantized) on an asymmetric grid
    k_grids = [(n, m) for n, m in model.named_modules() if isinstance(m, KQuantLinear)]
    if k_grids:
        raise LowbitError(k_grid_refusal(k_grids[0][0], k_grids[0][1].ggml, "compressed-tensors"))
    packed = (m for m in model.modules()
              if isinstance(m, WeightOnlyLinear) and not isinstance(m, (ActQuantLinear, Int8OutlierLinear)))
    if any(not m.symmetric for m in packed):
        raise asymmetric_weights_refusal()
    state, quantization_config = compressed_state_dict(model)
    write_hf_folder(folder, out, overwrite, state, quantization_config)
    return quantization_config
