"""Rotate a model's residual stream by an orthogonal Q, folded into its weights, and prove it block by block.

Where the residual stream h [tokens, width] is read, it passes through an RMSNorm first; where it is written, a
Linear's output is added to it. With every norm's weight g folded into the Linears it feeds (W diag(g)), the norms
compute x / rms(x), which commutes with Q. So the model computes the same function on h Q when
  * the embedding table's rows are rotated: E Q,
  * every Linear (and router) reading a norm's output reads it rotated: W diag(g) Q,
  * every Linear writing to the stream writes it rotated: Q^T W (rows), b Q,
  * the head reads the final norm's output rotated: W_head diag(g_final) Q (a head tied to the embedding is untied:
    E diag(g) Q is not E Q).
Nothing runs at inference time; the rotated model is an ordinary one of its architecture. What this needs of a
block (each reading norm is weight-only and before its Linears; no norm on a Linear's output, which Gemma 2/3's
sandwich norms are) is checked before any work, and every block's rotation is proven on calibration sequences
like a scale fold (pipeline/fold.py): the rotated block on h Q must give the float block's output on h, times Q.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.arch import Arch, block_linears
from lowbit.models.experts import router_matrix
from lowbit.models.lazy import output_embedding_key
from lowbit.pipeline.capture import run_block
from lowbit.pipeline.fold import (
    FOLD_TOLERANCE, FoldProof, Probe, float32_parameters, highest_matmul_precision, relative_change,
)

FIX = "quantize without the rotate step"
# in a transform artifact: the seed of the rotation the scales after it were searched in (absent: no rotation)
ROTATION_MARK = "rotate.seed"


def check_saved_rotation(saved: dict[str, torch.Tensor], seed: int | None) -> None:
    """Scales saved by an earlier run fold only into a model rotated as that one was (``seed`` None: unrotated)."""
    mark = saved.get(ROTATION_MARK)
    saved_seed = None if mark is None else int(mark.flatten()[0])
    if saved_seed != seed:
        def say(s: int | None) -> str:
            return "an unrotated model" if s is None else f"a model rotated with seed {s}"
        raise LowbitError(f"the saved transforms were searched on {say(saved_seed)}, this recipe quantizes {say(seed)}; "
                          "re-use transforms of a recipe with the same rotation, or drop --transforms")


@dataclass(frozen=True)
class ResidualLayout:
    """How one block reads and writes the residual stream: each reading norm with the Linears and float routers it
    feeds (paths in the block), and the Linears whose outputs are added to the stream."""

    readers: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    writers: tuple[str, ...]
    # other norms of the stream's width: on a Linear's output inside attention (OLMoE's q_norm: harmless), or before
    # the output is added to the stream (Gemma 2/3's post-norms: the rotation cannot pass them); the proof tells
    others: tuple[str, ...] = ()


def _vector_weight(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.shape[0] == width


def residual_layout(block: nn.Module, arch: Arch, width: int, model_type: str) -> ResidualLayout:
    """Where ``block`` reads (norm -> Linears, from the architecture entry's scale groups) and writes (every other
    Linear with ``width`` outputs) its residual stream of ``width`` channels; one line when a rotation cannot pass
    (a reading LayerNorm: its mean does not commute with a rotation; no reads or writes found)."""
    readers: dict[str, tuple[set[str], set[str]]] = {}
    for group in arch.groups:
        if not arch.applies(group, block) or isinstance(block.get_submodule(group.prev), nn.Linear):
            continue
        linears, passengers = readers.setdefault(group.prev, (set(), set()))
        linears.update(group.linears)
        passengers.update(group.passengers)
    others = []  # norms of the stream's width that read no residual: on a Linear's output (proven harmless or not)
    for name, module in block.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or not _vector_weight(module, width):
            continue
        if name not in readers:
            others.append(name)
        elif isinstance(module, nn.LayerNorm) or getattr(module, "bias", None) is not None:
            raise LowbitError(
                f"model type {model_type!r}: {name} is a {type(module).__name__} with a mean or a bias, which does "
                f"not commute with a rotation (QuaRot's rotations need RMSNorm); {FIX}"
            )
    for name in readers:
        if not _vector_weight(block.get_submodule(name), width):
            raise LowbitError(f"model type {model_type!r}: {name} does not hold a weight per residual channel; {FIX}")
    read = {p for linears, passengers in readers.values() for p in (*linears, *passengers)}
    writers = tuple(p for p, lin in block_linears(block).items() if p not in read and lin.out_features == width)
    if not readers or not writers:
        raise LowbitError(f"model type {model_type!r}: no norm -> Linear reads or Linear writes of the residual stream "
                          f"found in a block; {FIX}")
    return ResidualLayout(
        tuple((norm, tuple(sorted(ls)), tuple(sorted(ps))) for norm, (ls, ps) in readers.items()), writers,
        tuple(others),
    )


def _set(tensor: torch.Tensor, value: torch.Tensor) -> None:
    tensor.copy_(value.to(tensor.dtype))


@torch.no_grad()
def rotate_block(block: nn.Module, layout: ResidualLayout, q: torch.Tensor, norm_offset: float) -> None:
    """Fold each reading norm's weight into the Linears it feeds and rotate the block's reads and writes by ``q``
    [width, width] (computed in float64, stored in each tensor's dtype)."""
    for norm_path, linears, passengers in layout.readers:
        norm = block.get_submodule(norm_path)
        q_here = q.to(norm.weight.device)
        g = norm.weight.double() + norm_offset  # [width]: what the norm multiplies x / rms(x) by
        matrices = [block.get_submodule(p).weight for p in linears] + [router_matrix(block.get_submodule(p))
                                                                        for p in passengers]
        for w in matrices:  # [out, width]: columns
            _set(w, (w.double() * g) @ q_here)
        norm.weight.fill_(1.0 - norm_offset)  # the norm now multiplies by one
    for path in layout.writers:
        linear = block.get_submodule(path)
        q_here = q.to(linear.weight.device)
        _set(linear.weight, q_here.T @ linear.weight.double())  # [width, in]: rows
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ q_here)


@torch.no_grad()
def prove_rotation(
    block: nn.Module, probe: Probe, q: torch.Tensor, apply: Callable[[], None], undo: Callable[[], None],
    tolerance: float = FOLD_TOLERANCE,
) -> FoldProof:
    """``apply`` the rotation and keep it only if the rotated block on the probe's (rotated) inputs gives the
    unrotated block's output on the unrotated inputs, times Q, in float32 within ``tolerance``; else ``undo``."""
    with float32_parameters(block), highest_matmul_precision():
        qf = q.to(device=probe.hidden.device, dtype=torch.float32)
        before = run_block(block, probe.hidden @ qf.T, probe.call)
        apply()
        after = run_block(block, probe.hidden, probe.call)
        change = relative_change(after, before @ qf) if torch.isfinite(after).all() else math.nan
        proof = FoldProof(change, tolerance)
        if not proof.holds:
            undo()
    return proof


ROWS_PER_CHUNK = 4096  # a 128k-token vocabulary of width 8192 would take 8 GiB in float64 at once


@torch.no_grad()
def rotate_rows(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(w diag(scale)) q for a table w [rows, width], in float64 a chunk of rows at a time, in w's dtype."""
    q = q.to(w.device)
    scale = None if scale is None else scale.to(device=w.device, dtype=torch.float64)
    out = torch.empty_like(w)
    for start in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = w[start : start + ROWS_PER_CHUNK].double()
        out[start : start + ROWS_PER_CHUNK] = ((rows if scale is None else rows * scale) @ q).to(w.dtype)
    return out


def final_norm_path(model: nn.Module, blocks_path: str) -> str:
    """The norm between the last block and the head: the one module outside the blocks with a weight per residual
    channel that is not the embedding."""
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[1]
    found = [name for name, m in model.named_modules()
             if not (name == blocks_path or name.startswith(blocks_path + ".")) and m is not embedding
             and not isinstance(m, nn.Linear) and _vector_weight(m, width)]
    if len(found) != 1:
        raise LowbitError(f"expected one norm between the last block and the head, found {found or 'none'}; {FIX}")
    return found[0]


@dataclass(frozen=True)
class OutsideRotation:
    """The rotation of the tensors outside the blocks: the embedding, the final norm and the head (names in the
    state dict); ``tied``: the checkpoint's head is its embedding (the output gets a head of its own)."""

    q: torch.Tensor  # [width, width] float64
    norm_offset: float
    embedding: str
    final_norm: str
    head: str
    tied: bool

    @torch.no_grad()
    def apply_loaded(self, model: nn.Module) -> None:
        """Rotate what capturing block 0's inputs reads (the embedding) and the final norm, in a model whose
        modules outside the blocks were just read; a head still on meta (not read) is left alone."""
        norm = model.get_submodule(self.final_norm)
        head = model.get_output_embeddings()
        if head is not None and head.weight.device.type != "meta" and not self.tied:
            head.weight.data = self.head_weight(head.weight, norm.weight)
        embedding = model.get_input_embeddings()
        if embedding.weight.device.type != "meta":
            embedding.weight.data = self.embedding_weight(embedding.weight)
        if norm.weight.device.type != "meta":
            norm.weight.data = self.norm_weight(norm.weight)

    @torch.no_grad()
    def apply_in_memory(self, model: nn.Module) -> None:
        """The whole rotation on a model held in memory: a tied head becomes a Parameter of its own."""
        head = model.get_output_embeddings()
        norm = model.get_submodule(self.final_norm)
        if self.tied and head is not None:
            head.weight = nn.Parameter(self.head_weight(head.weight, norm.weight), requires_grad=False)
            model.config.tie_word_embeddings = False
        self.apply_loaded(model)

    def embedding_weight(self, e: torch.Tensor) -> torch.Tensor:
        return rotate_rows(e, self.q)  # [vocab, width]: each row rotated

    def head_weight(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return rotate_rows(w, self.q, g.double() + self.norm_offset)  # [vocab, width]

    def norm_weight(self, g: torch.Tensor) -> torch.Tensor:
        return torch.full_like(g, 1.0 - self.norm_offset)

    def written(self, items: Iterator[tuple[str, torch.Tensor]], read: Callable[[str], torch.Tensor]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors outside the blocks as the rotated output stores them, from the checkpoint's ``items`` (a
        tied checkpoint's items lack the head: it is added after the embedding); ``read(name)`` reads one tensor."""
        g = read(self.final_norm_key)
        for name, tensor in items:
            if name == self.embedding:
                yield name, self.embedding_weight(tensor)
                if self.tied:
                    yield self.head, self.head_weight(tensor, g)
            elif name == self.head:
                yield name, self.head_weight(tensor, g)
            elif name == self.final_norm_key:
                yield name, self.norm_weight(tensor)
            else:
                yield name, tensor

    @property
    def final_norm_key(self) -> str:
        return f"{self.final_norm}.weight"


def outside_rotation(model: nn.Module, arch: Arch, q: torch.Tensor, tied: bool) -> OutsideRotation:
    embedding = model.get_input_embeddings()
    path = next(name for name, m in model.named_modules() if m is embedding)
    if getattr(embedding, "max_norm", None) is not None:
        raise LowbitError(f"the input embedding renormalises its rows (max_norm), which a rotation changes; {FIX}")
    return OutsideRotation(q, arch.norm_offset, f"{path}.weight", final_norm_path(model, arch.blocks),
                           output_embedding_key(model), tied)
