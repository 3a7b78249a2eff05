"""The tensors outside the decoder blocks a recipe asks to quantize: the input embedding table and the output head.

Each is quantized on the recipe's grid for it (``Recipe.embeddings`` / ``Recipe.head``), per row of the table (a
row is a token: groups run along the hidden dimension, as for any Linear's input columns). The embedding is rounded
to nearest. An untied head is rounded by the recipe's rounding method when that method fits a Linear to its inputs
(GPTQ: with the Hessian of the head's inputs, the final norm's outputs on the calibration text,
pipeline/head_inputs.py), else to nearest. A tied head is the embedding: one table, rounded to nearest once (error
feedback tuned to the head's outputs would move the embedding's rows), stored once (``TiedQuantizedHead`` reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import Compression, LinearStats, Step, WeightQuant
from lowbit.methods.rtn import RTN
from lowbit.models.lazy import ties_embeddings
from lowbit.numerics.float_quant import FloatQWeight
from lowbit.numerics.kquant import KParams, KQWeight
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import rtn
from lowbit.recipe import Recipe
from lowbit.runtime.embedding import QuantizedEmbedding, TiedQuantizedHead, quantized_embedding
from lowbit.runtime.kquant_linear import weight_only_linear
from lowbit.runtime.registry import module_config

FIX = "quantize without the recipe's 'embeddings'/'head' grids"


@dataclass(frozen=True)
class OutsidePlan:
    """Which modules the recipe quantizes outside the blocks, by path, and on which grid."""

    embedding: str | None  # the input embedding's module path, when it is quantized
    head: str | None  # the output head's module path, when it is quantized
    tied: bool  # head and embedding are one table (then both paths are set and share ``embedding_grid``)
    embedding_grid: WeightQuant | None
    head_grid: WeightQuant | None
    embed_scale: float | None  # the factor a scaled embedding multiplies rows by (Gemma), float32-rounded
    head_step: Step | None = None  # what rounds an untied head (RTN, or the recipe's GPTQ on the head's grid)

    @property
    def head_needs_hessian(self) -> bool:
        return self.head_step is not None and self.head_step.needs().hessian


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None) if target is not None else None


def plan_outside(model: nn.Module, recipe: Recipe) -> OutsidePlan | None:
    """What ``recipe`` does outside the blocks of ``model`` (a skeleton is enough), checked: None when nothing."""
    if not recipe.quantizes_outside_blocks:
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = ties_embeddings(model.config) and head is not None
    if tied and recipe.embeddings is not None and recipe.head is not None and recipe.embeddings != recipe.head:
        raise LowbitError(
            f"this model's head is its input embedding (tied): one table, one grid, but the recipe gives embeddings "
            f"{recipe.embeddings.label} and head {recipe.head.label}; give both the same grid (or one of them)"
        )
    embedding_grid = recipe.embeddings if not tied else (recipe.embeddings or recipe.head)
    if embedding_grid is not None:
        _check_lookup(emb)
        # a llama.cpp mix's type for the table (a tied one is quantized as the head), falling back by its width
        embedding_grid = embedding_grid.for_table(head=tied, width=emb.embedding_dim)  # type: ignore[union-attr]
    head_grid = embedding_grid if tied else recipe.head
    if head_grid is not None and not tied:
        if not isinstance(head, nn.Linear):
            raise LowbitError(f"the output head is a {type(head).__name__}, not a Linear lowbit can quantize; {FIX}")
        head_grid = head_grid.for_table(head=True, width=head.in_features)
    return OutsidePlan(
        embedding=_path_of(model, emb) if embedding_grid is not None else None,
        head=_path_of(model, head) if head_grid is not None else None,
        tied=tied, embedding_grid=embedding_grid, head_grid=head_grid, embed_scale=embed_scale_of(emb),
        head_step=head_rounding(recipe, head_grid) if head_grid is not None and not tied else None,
    )


def head_rounding(recipe: Recipe, grid: WeightQuant) -> Step:
    """The recipe's rounding step on the head's grid when it fits a Linear to a Hessian without pruning it (GPTQ),
    else round-to-nearest."""
    step = recipe.weight_step
    if step is not None and not step.prunes and step.needs().hessian and isinstance(step.grid, WeightQuant):
        return dataclasses.replace(step, weights=grid)
    return RTN(grid)


def round_head(weight: torch.Tensor, plan: OutsidePlan, hessian: torch.Tensor | None) -> QWeight | KQWeight:
    """An untied head's weight [vocab, hidden] rounded by the plan's head step (``hessian`` [hidden, hidden] when
    that step needs one)."""
    assert plan.head_step is not None and plan.head_grid is not None
    if isinstance(plan.head_step, RTN) and not plan.head_step.weighs:  # rounded to nearest: a slice at a time
        return quantize_table(weight, plan.head_grid)
    if plan.head_needs_hessian and hessian is None:
        raise LowbitError(f"{plan.head_step.kind} rounds the head from its inputs, which need calibration data")
    c = Compression(weight.detach().float())
    plan.head_step.compress(c, LinearStats(hessian=None if hessian is None else hessian.to(c.weight.device)))
    assert c.qweight is not None
    return c.qweight


def _check_lookup(emb: nn.Module | None) -> None:
    """Only a plain table lookup (optionally times a constant: Gemma's scaled embedding) is replaced: any other
    embedding computes something a packed lookup would silently drop."""
    plain = type(emb) is nn.Embedding or (
        isinstance(emb, nn.Embedding) and type(emb).__name__.endswith("ScaledWordEmbedding") and hasattr(emb, "embed_scale")
    )
    if not plain or emb.max_norm is not None:  # type: ignore[union-attr]
        raise LowbitError(f"the input embedding is a {type(emb).__name__}, not a plain lookup table; {FIX}")


def embed_scale_of(emb: nn.Module | None) -> float | None:
    """A scaled embedding's factor as the float32 value its forward multiplies by (the skeleton's buffer may be on
    meta by now: Gemma also keeps the plain number)."""
    value = getattr(emb, "scalar_embed_scale", None)
    if value is None and isinstance(getattr(emb, "embed_scale", None), torch.Tensor) and emb.embed_scale.device.type != "meta":
        value = float(emb.embed_scale)
    return None if value is None else float(torch.tensor(value, dtype=torch.float32))


# rows of a table rounded at a time: rounding makes several float32 copies of what it rounds (the grid expanded
# to every column, the codes), which for a whole 128k x 4096 vocabulary would be gigabytes
TABLE_ROWS = 16384


def quantize_table(weight: torch.Tensor, grid: WeightQuant) -> QWeight | KQWeight:
    """A table [rows, dim] (an embedding, or a head's weight [vocab, hidden]) rounded to nearest on ``grid``, in
    slices of rows where each row's grid is its own (the same codes and scales as rounding it whole)."""
    step = weight.shape[0] if grid.granularity == "tensor" else TABLE_ROWS
    parts = [rtn(weight[i : i + step].detach().float(), grid) for i in range(0, weight.shape[0], step)]
    assert not any(isinstance(p, FloatQWeight) for p in parts)  # the recipe refuses float grids outside the blocks
    return parts[0] if len(parts) == 1 else _rows_joined(parts)  # type: ignore[return-value]


def _rows_joined(parts: list) -> QWeight | KQWeight:
    """One weight from row slices of it, each rounded on its own (per-row grids: no per-tensor scale, no g_idx)."""
    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if tensors[0] is None else torch.cat(tensors)  # type: ignore[arg-type]

    first = parts[0]
    if isinstance(first, KQWeight):
        params = KParams(*(cat([getattr(p.params, f.name) for p in parts]) for f in dataclasses.fields(KParams)))
        return KQWeight(torch.cat([p.codes for p in parts]), params, first.kind)
    return dataclasses.replace(first, codes=torch.cat([p.codes for p in parts]), scale=cat([p.scale for p in parts]),
                               zero=cat([p.zero for p in parts]))


def quantize_outside_in_memory(
    model: nn.Module, plan: OutsidePlan | None, dtype: torch.dtype, head_hessian: torch.Tensor | None = None
) -> None:
    """The API's path: swap the quantized modules into ``model`` (whose weights are in memory)."""
    if plan is None:
        return
    embedding: QuantizedEmbedding | None = None
    if plan.embedding is not None:
        assert plan.embedding_grid is not None
        table = model.get_submodule(plan.embedding).weight
        embedding = quantized_embedding(quantize_table(table, plan.embedding_grid), plan.embed_scale, dtype)
        model.set_submodule(plan.embedding, embedding)
    if plan.head is not None:
        if plan.tied:
            assert embedding is not None
            model.set_submodule(plan.head, TiedQuantizedHead(embedding))
        else:
            head = model.get_submodule(plan.head)
            model.set_submodule(plan.head, weight_only_linear(round_head(head.weight, plan, head_hessian), head.bias))


def packed_outside(
    name: str, tensor: torch.Tensor, plan: OutsidePlan | None, dtype: torch.dtype, head_has_bias: bool = False,
    head_hessian: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
    """The checkpoint path: tensor ``name`` as read from the source, packed when the plan quantizes it. Returns the
    tensors to write and the module config entry, or None for a tensor the plan leaves alone (a head's bias among
    them: it is written as read, under the name the packed head's ``bias`` buffer loads)."""
    if plan is None:
        return None
    if plan.embedding is not None and name == f"{plan.embedding}.weight":
        assert plan.embedding_grid is not None
        module: nn.Module = quantized_embedding(quantize_table(tensor, plan.embedding_grid), plan.embed_scale, dtype)
        path = plan.embedding
    elif plan.head is not None and not plan.tied and name == f"{plan.head}.weight":
        module = weight_only_linear(round_head(tensor, plan, head_hessian), None)
        path = plan.head
    else:
        return None
    config = module_config(module)
    if path == plan.head and head_has_bias:
        config["has_bias"] = True
    return {f"{path}.{k}": v for k, v in module.state_dict().items()}, {path: config}


def tied_head_entry(plan: OutsidePlan | None) -> dict[str, str] | None:
    """lowbit_config.json's record of a quantized tied head: the head reads the embedding's table."""
    if plan is None or not plan.tied or plan.head is None or plan.embedding is None:
        return None
    return {"head": plan.head, "embedding": plan.embedding}


def tied_head_of(model: nn.Module) -> dict[str, str] | None:
    """The tied-head entry of an in-memory quantized model (``lowbit.save``)."""
    head = model.get_output_embeddings()
    if not isinstance(head, TiedQuantizedHead):
        return None
    return {"head": _path_of(model, head) or "lm_head", "embedding": _path_of(model, head.embedding) or ""}


def tie_quantized_head(model: nn.Module, head_path: str, embedding_path: str) -> None:
    """After loading: the tied head reads the embedding's packed table."""
    embedding = model.get_submodule(embedding_path)
    if not isinstance(embedding, QuantizedEmbedding):
        raise LowbitError(f"the checkpoint ties {head_path!r} to {embedding_path!r}, which is not a quantized embedding; "
                          "re-run lowbit quantize")
    model.set_submodule(head_path, TiedQuantizedHead(embedding))
