"""Export a lowbit checkpoint in the GPTQ checkpoint format (AutoGPTQ's, kept by GPTQModel): what vLLM,
transformers (through gptqmodel), ExLlama and most GPTQ models on the Hub load. Weight-only INT2/3/4/8 grids,
per group or per channel, symmetric or asymmetric, act-order with a g_idx or without.

Per quantized Linear (lowbit's integer codes and float16 scales unchanged):
  qweight int32 [in * bits / 32, out]        codes packed along the input dimension
  qzeros  int32 [n_groups, out * bits / 32]  zero points packed along the output dimension
  scales  float16 [n_groups, out]
  g_idx   int32 [in]                         each input column's group (act-order: not in column order)
  bias    (when the Linear has one)
so scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) is lowbit's weight W_hat[o, i] exactly. Packing is a
little-endian bit stream per column: value i occupies bits [i * bits, (i + 1) * bits) of the column's words, so 32
values fill `bits` words (for 3 bits some values straddle two words, as GPTQ's 3-bit layout has them). That is
lowbit's own byte packing (numerics/packing.py) read as little-endian int32.

Zero points: the original format ("gptq", v1) stores z - 1, and readers add the 1 back per packed value; a zero of 0
cannot be stored that way, asymmetric grids can have zeros of 0, and GPTQModel 7.6 refuses asymmetric v1 checkpoints
from other producers. lowbit therefore writes symmetric grids as v1 (z = 2**(bits - 1), stored 2**(bits - 1) - 1:
every reader knows it) and asymmetric grids as "gptq_v2" (z stored as is), which GPTQModel and vLLM (since PR 26092,
2025-10) read; a reader that knows only v1 would be off by one scale step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.hf_folder import write_hf_folder
from lowbit.models.experts import RoutedExperts, is_router
from lowbit.numerics.grid import symmetric_zero
from lowbit.numerics.packing import pack_bits
from lowbit.numerics.qweight import QWeight
from lowbit.recipe import Recipe
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.float_linear import FloatQuantLinear
from lowbit.runtime.embedding import QuantizedEmbedding
from lowbit.runtime.fast import KernelModule
from lowbit.runtime.kquant_linear import KQuantLinear, k_grid_refusal
from lowbit.runtime.llm_int8 import Int8OutlierLinear
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from lowbit.runtime.rotated_input import refuse_online_rotations

GPTQ_DIR = "gptq"  # where `lowbit quantize --format gptq` puts it, inside the output
GPTQ_BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG = "quantize_config.json"
NO_OUTSIDE_BLOCKS = ("the GPTQ format has no quantized embedding or head: export a recipe without 'embeddings'/'head' "
                     "(GGUF holds them)")


def check_recipe_for_gptq(recipe: Recipe) -> None:
    """Refuse, before any quantization work, a recipe whose output the GPTQ format cannot hold."""
    recipe.check_export("gptq")
    step = recipe.weight_step
    grid = getattr(step, "grid", None)
    if grid is None:
        raise LowbitError("the GPTQ format holds quantized weights; this recipe rounds none (pruning only?): add a "
                          "GPTQ/RTN/AWQ weight grid or export compressed-tensors")
    check_grid(grid.bits, grid.granularity == "tensor")
    if recipe.quantizes_outside_blocks:
        raise LowbitError(NO_OUTSIDE_BLOCKS)


def check_grid(bits: int, per_tensor: bool) -> None:
    if bits not in GPTQ_BITS:
        raise LowbitError(f"the GPTQ format packs {', '.join(map(str, GPTQ_BITS))}-bit codes, not {bits}-bit; "
                          "quantize with one of those widths")
    if per_tensor:
        raise LowbitError("the GPTQ format has no per-tensor grid; quantize per channel or per group")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] -> int32 [rows, n * bits / 32]: each row a little-endian bit stream of ``bits``-bit
    values, read as little-endian 32-bit words (the GPTQ format's packing, along whichever dimension is last)."""
    if sys.byteorder != "little":  # the bytes are reinterpreted as int32 in place
        raise LowbitError("GPTQ export needs a little-endian machine")
    flat = pack_bits(codes.contiguous(), bits).reshape(-1).contiguous()  # 1-D, so the view's strides are plain
    return flat.view(torch.int32).reshape(codes.shape[0], -1)


def _packable(name: str, what: str, n: int, bits: int) -> None:
    if n * bits % 32:
        step = 32 // math.gcd(bits, 32)
        raise LowbitError(f"{name}: its {what} ({n}) is not a multiple of {step}, which {bits}-bit GPTQ packing into "
                          "32-bit words needs; quantize with another width or keep lowbit's own format")


def gptq_module(name: str, qweight: QWeight, v2: bool) -> dict[str, torch.Tensor]:
    """One Linear's GPTQ tensors (local names) from its lowbit QWeight [out, in]."""
    check_grid(qweight.bits, qweight.scale.shape[0] == 1 and qweight.out_features > 1)
    _packable(name, "input width", qweight.in_features, qweight.bits)
    _packable(name, "output width", qweight.out_features, qweight.bits)
    if qweight.zero is None:
        zero = torch.full_like(qweight.scale, symmetric_zero(qweight.bits), dtype=torch.uint8)
    else:
        zero = qweight.zero
    stored = zero if v2 else zero - 1  # v1: z - 1 (symmetric grids only: never below 0)
    return {
        "qweight": pack_int32(qweight.codes, qweight.bits).T.contiguous(),  # [in * bits / 32, out]
        "qzeros": pack_int32(stored.T, qweight.bits),  # [n_groups, out * bits / 32]
        "scales": qweight.scale.T.contiguous().to(torch.float16),  # [n_groups, out]
        "g_idx": qweight.group_index().to(torch.int32),  # [in]
    }


def _one_grid(quantized: dict[str, QWeight]) -> tuple[int, int, bool]:
    """(bits, group size or -1 for per channel, symmetric) shared by every Linear, or a refusal. A Linear with a
    single group fits any group size (readers give it ceil(in / group_size) = 1 group)."""
    kinds = {(q.bits, q.symmetric) for q in quantized.values()}
    sizes = {q.group_size for q in quantized.values() if q.scale.shape[1] > 1}
    if len(kinds) > 1 or len(sizes) > 1:
        raise LowbitError(f"a GPTQ checkpoint has one grid for every Linear; this model mixes (bits, symmetric) "
                          f"{sorted(kinds)} and group sizes {sorted(sizes)}: quantize with one grid or export "
                          "compressed-tensors")
    (bits, symmetric), = kinds
    return bits, sizes.pop() if sizes else -1, symmetric


def gptq_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, quantize_config) of a lowbit-loaded model; a pure function of the model."""
    from lowbit import __version__
    from lowbit.models.checkpoint_names import hub_tensor_name

    head = model.get_output_embeddings()
    routers = {id(m) for m in model.modules() if is_router(m)}  # kept in float by design (models/experts.py)
    quantized: dict[str, QWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, KernelModule):
            raise LowbitError("the GPTQ export reads lowbit's stored grids: load the model with the default "
                              "backend (lowbit.load(folder)), not backend='fast' or 'dequantized'")
        if isinstance(module, QuantizedEmbedding) or (module is head and isinstance(module, WeightOnlyLinear)):
            raise LowbitError(NO_OUTSIDE_BLOCKS)
        if isinstance(module, (ActQuantLinear, Int8OutlierLinear)):
            raise LowbitError(f"{name} quantizes its inputs (W8A8 / LLM.int8()), which the GPTQ format cannot hold; "
                              "export compressed-tensors")
        if isinstance(module, SparseLinear):
            raise LowbitError(f"{name} is pruned, not quantized; the GPTQ format holds quantized Linears only: "
                              "export compressed-tensors (dense) or add a weight grid after the pruning")
        if isinstance(module, KQuantLinear):
            raise LowbitError(k_grid_refusal(name, module.ggml, "the GPTQ format"))
        if isinstance(module, FloatQuantLinear):
            raise LowbitError(f"{name} is on the {module.float_type} float grid, which the GPTQ format (integer codes) "
                              "cannot hold: export compressed-tensors")
        if isinstance(module, WeightOnlyLinear):
            quantized[name] = module.unpacked()
        elif isinstance(module, nn.Linear) and module is not head and id(module) not in routers:
            raise LowbitError(f"{name} was left in float; a GPTQ checkpoint's readers quantize every Linear of the "
                              "blocks: quantize it too (drop it from the recipe's 'ignore') or keep lowbit's format")
    if not quantized:
        raise LowbitError("no quantized Linear found: export a lowbit output directory made by `lowbit quantize` "
                          "with a weight grid")
    bits, group_size, symmetric = _one_grid(quantized)
    if not symmetric and any(isinstance(m, RoutedExperts) for m in model.modules()):
        # vLLM's GPTQ MoE path reads experts as symmetric whatever the checkpoint says: a silently wrong model
        raise LowbitError("an asymmetric GPTQ checkpoint of a mixture-of-experts model would be read as symmetric by "
                          "vLLM's expert kernels; quantize with a symmetric grid (e.g. weights symmetric: true)")
    # v1 stores zero - 1, so it cannot hold an asymmetric grid's zero of 0, and GPTQModel refuses asymmetric v1 from
    # any other producer (AutoGPTQ's was broken): asymmetric grids go out as v2, symmetric ones as v1
    v2 = not symmetric
    state: dict[str, torch.Tensor] = {}
    for name, qweight in quantized.items():
        state.update({f"{name}.{k}": v for k, v in gptq_module(name, qweight, v2).items()})
    for name, tensor in model.state_dict().items():
        owner, leaf = name.rsplit(".", 1)
        # a quantized Linear keeps only its bias besides the GPTQ tensors (lowbit's own buffers are left out)
        if (owner not in quantized or leaf == "bias") and "rotary_emb" not in name:
            state.setdefault(name, tensor)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop(next(n for n, m in model.named_modules() if m is head) + ".weight", None)
    model_type = model.config.model_type
    state = {hub_tensor_name(model_type, k): v.detach().contiguous() for k, v in state.items()}
    desc_act = any(not q.groups_in_order for q in quantized.values())
    config = {
        "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": symmetric, "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": "gptq_v2" if v2 else "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
    }
    return state, config


def write_gptq(folder: Path, model: nn.Module, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the GPTQ export of ``model`` (loaded from lowbit output ``folder``) to directory ``out``, atomically:
    model.safetensors, config.json with ``quantization_config``, quantize_config.json, the tokenizer files.
    Returns the quantize config."""
    refuse_online_rotations(model, "a GPTQ checkpoint")
    state, quantize_config = gptq_state_dict(model)
    write_hf_folder(folder, out, overwrite, state, quantize_config, {QUANTIZE_CONFIG: quantize_config})
    return quantize_config
