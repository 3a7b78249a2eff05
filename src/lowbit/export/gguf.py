"""Export a lowbit checkpoint of a Llama, Mistral, Qwen2/3, Gemma 3 or Phi-3 model to GGUF (llama.cpp, ollama), keeping
lowbit's own GPTQ/AWQ-optimised integer weights: quantized Linears become K-quant (Q2_K .. Q6_K) or Q8_0 / Q5_0 / Q5_1
/ Q4_0 / Q4_1 blocks, a quantized embedding (``token_embd``) and head (``output``) 32-column blocks
(export/ggml_blocks.py), everything else float32.

GGUF follows llama.cpp's converter: tensor names ``blk.N.attn_q.weight`` ..., q/k rows permuted into llama.cpp's
rotary layout where its graph wants it (transformers undoes this on load), Gemma's norms stored as 1 + weight (each
family's rules: export/gguf_arch.py), the config as llama.cpp's keys, and the tokenizer llama.cpp must run it with
(export/gguf_vocab.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.ggml_blocks import GGML_HOLDS, ggml_blocks, ggml_kind, ggml_type_for
from lowbit.export.gguf_arch import (
    GGUF_ARCHITECTURES, add_arch_metadata, check_config, gguf_arch, gguf_tensor_names, no_biases,
)
from lowbit.export.gguf_vocab import TokenizerKeys, check_vocabulary, gguf_tokenizer
from lowbit.io.atomic import atomic_file
from lowbit.numerics.kquant import KParams, KQWeight
from lowbit.numerics.qweight import QWeight
from lowbit.recipe import Recipe
from lowbit.runtime.embedding import QuantizedEmbedding
from lowbit.runtime.float_linear import FloatQuantLinear
from lowbit.runtime.kquant_linear import KQuantLinear
from lowbit.runtime.sparse import SparseLinear
from lowbit.runtime.weight_only import WeightOnlyLinear
from lowbit.runtime.rotated_input import refuse_online_rotations

GGUF_FILE = "model.gguf"  # where `lowbit quantize --format gguf` puts it, inside the output directory


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved. t [out, ...] (codes or scales)."""
    dim = t.shape[0] // n_head // 2
    return t.reshape(n_head, 2, dim, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def permuted(qweight: QWeight | KQWeight, n_head: int) -> QWeight | KQWeight:
    """``qweight`` with its rows in llama.cpp's q/k order (``permute_rows``)."""
    if isinstance(qweight, KQWeight):
        p = qweight.params
        rows = [None if t is None else permute_rows(t, n_head) for t in (p.d, p.sc, p.dmin, p.m)]
        return KQWeight(permute_rows(qweight.codes, n_head), KParams(*rows), qweight.kind)
    zero = permute_rows(qweight.zero, n_head) if qweight.zero is not None else None
    return QWeight(permute_rows(qweight.codes, n_head), permute_rows(qweight.scale, n_head), zero, qweight.bits,
                   qweight.group_size, qweight.g_idx)


def _has_unheld_biases(config: dict[str, Any]) -> bool:
    """Whether a config.json's flags give Linears biases its GGUF architecture has no place for (Qwen2's q/k/v biases
    are built in and held; an ``attention_bias`` flag elsewhere means o_proj's too)."""
    arch = GGUF_ARCHITECTURES[config.get("model_type", "")]
    return bool(config.get("mlp_bias")) or (bool(config.get("attention_bias")) and not arch.biases)


def check_recipe_for_gguf(recipe: Recipe, source: Path) -> None:
    """Refuse, before any quantization work, a recipe whose output GGUF cannot hold, or a source model (HF folder)
    whose architecture or tokenizer it cannot."""
    config = json.loads((source / "config.json").read_text())
    model_type = config.get("model_type", "")
    gguf_arch(model_type)
    if _has_unheld_biases(config):
        raise LowbitError(no_biases(model_type))
    check_config(model_type, config)
    recipe.check_export("gguf")
    grids = [s.grid for s in recipe.steps if s.grid is not None]
    if not grids:
        raise LowbitError(
            "GGUF export needs quantized weights and has no sparse format; this recipe has no RTN/GPTQ/AWQ/SparseGPT "
            "weight grid: add one (e.g. GPTQ W4 symmetric g32 after the pruning step) or export compressed-tensors"
        )
    outside = {"embeddings": recipe.embeddings, "head": recipe.head}
    for what, grid in [("weights", grids[-1]), *((k, g) for k, g in outside.items() if g is not None)]:
        if not grid.ggml and ggml_kind(grid.bits, grid.symmetric, grid.group_size if grid.granularity == "group" else None) is None:
            raise LowbitError(f"{GGML_HOLDS}; this recipe's {what} are {grid.label}: use group_size 32")
    rows = int(config.get("vocab_size") or 0)  # the embedding's rows, before the whole run, not after it
    check_vocabulary(gguf_tokenizer(source, rows, gguf_arch(model_type).space_prefix), rows)


def check_exportable(model: nn.Module) -> dict[str, str]:
    """GGML type of every quantized Linear, checked before anything is written."""
    model_type = model.config.model_type
    arch = gguf_arch(model_type)
    check_config(model_type, model.config.to_dict())
    types: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding):  # token_embd: llama.cpp looks rows up in these blocks too
            try:
                types[name] = ggml_type_for(module.unpacked())
            except LowbitError as exc:
                raise LowbitError(f"{name}: {exc}") from None
        if isinstance(module, WeightOnlyLinear):
            if isinstance(module, FloatQuantLinear):
                raise LowbitError(f"{name} is on the {module.float_type} float grid, which lowbit's GGUF export does "
                                  "not write: export compressed-tensors, or quantize on a K-quant grid (e.g. gptq-q4_k_m)")
            if type(module) not in (WeightOnlyLinear, KQuantLinear):
                raise LowbitError(
                    f"{name} is {type(module).__name__} (activations quantized at run time), which GGUF cannot express; "
                    "export a weight-only recipe"
                )
            try:
                types[name] = ggml_type_for(module.unpacked())
            except LowbitError as exc:
                raise LowbitError(f"{name}: {exc}") from None
    names = gguf_tensor_names(model.config)
    biased = [names[n].rsplit(".", 1)[-1] for n, m in model.named_modules()
              if n in names and isinstance(getattr(m, "bias", None), torch.Tensor)]
    if any(role not in arch.biases for role in biased):
        raise LowbitError(no_biases(model_type))
    if not any(isinstance(m, WeightOnlyLinear) for m in model.modules()):
        pruned = any(isinstance(m, SparseLinear) for m in model.modules())
        raise LowbitError(
            "only pruned Linears found: GGUF has no sparse format; quantize them too (e.g. GPTQ W4 symmetric g32 "
            "after the pruning step) or export compressed-tensors" if pruned else
            "no quantized Linear found: export a lowbit output directory made by `lowbit quantize`"
        )
    return types


def write_gguf(folder: Path, model: nn.Module, out: Path, overwrite: bool = False) -> dict[str, str]:
    """Write ``model`` (a lowbit-loaded checkpoint from ``folder``) as GGUF file ``out``; returns the GGML type of
    each quantized Linear. Atomic (io/atomic.py): a failure leaves no partial file and an existing ``out`` intact."""
    import gguf

    refuse_online_rotations(model, "GGUF")
    types = check_exportable(model)
    rows = model.get_input_embeddings().num_embeddings
    tokenizer = gguf_tokenizer(folder, rows, gguf_arch(model.config.model_type).space_prefix)
    check_vocabulary(tokenizer, rows)
    with atomic_file(out, overwrite, inputs=[folder]) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf_arch(model.config.model_type).name)
        try:
            add_metadata(writer, folder.name, model.config, tokenizer)
            add_tensors(writer, model, types)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return types


def add_metadata(writer: Any, name: str, config: Any, tokenizer: TokenizerKeys) -> None:
    """llama.cpp's hyper-parameters and the tokenizer (export/gguf_vocab.py)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(config, "partial_rotary_factor", None) or 1.0
    writer.add_rope_dimension_count(int(rotary * head_dim))
    writer.add_key_length(head_dim)  # read by llama.cpp where head_dim is not hidden_size / heads (Qwen3)
    writer.add_value_length(head_dim)
    add_arch_metadata(writer, config)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokenizer.write(writer, config)


def add_tensors(writer: Any, model: nn.Module, types: dict[str, str]) -> None:
    import gguf

    config = model.config
    names = gguf_tensor_names(config)
    arch = gguf_arch(config.model_type)
    permute = arch.permute_qk
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads} if permute else {}
    norms = arch.norm_tensors
    tied = getattr(config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        gguf_name = names.get(name)
        if gguf_name is None or (name == "lm_head" and tied):
            continue
        n_head = heads.get(gguf_name.rsplit(".", 1)[-1])
        if name in types:  # a quantized Linear, embedding or untied head (a tied one is token_embd: llama.cpp's rule)
            qweight = module.unpacked()  # type: ignore[operator]
            if n_head is not None:  # permute whole rows: codes and every per-row grid tensor, so nothing is re-rounded
                qweight = permuted(qweight, n_head)
            kind, blocks = ggml_blocks(qweight)
            writer.add_tensor(f"{gguf_name}.weight", blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            weight = module.weight.detach().float()
            if n_head is not None:
                weight = permute_rows(weight, n_head)
            if arch.norm_offset and gguf_name.rsplit(".", 1)[-1] in norms:  # Gemma: llama.cpp scales by the weight
                weight = weight + arch.norm_offset
            writer.add_tensor(f"{gguf_name}.weight", np.ascontiguousarray(weight.cpu().numpy()))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):  # Qwen2's q/k/v biases (check_exportable refused any other)
            writer.add_tensor(f"{gguf_name}.bias", np.ascontiguousarray(bias.detach().float().cpu().numpy()))
