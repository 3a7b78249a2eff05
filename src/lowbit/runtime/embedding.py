"""The tensors outside the decoder blocks, packed: the input embedding table (looked up, then only the rows asked
for are dequantized, so its memory stays packed) and a head tied to it (the same packed table, multiplied).

An untied head is a ``WeightOnlyLinear`` like any other Linear. A tied head has no tensors of its own: the
checkpoint stores the table once, as the embedding's, and ``TiedQuantizedHead`` reads it from the embedding module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics.grid import group_count
from lowbit.numerics.packing import packed_length
from lowbit.numerics.qweight import QWeight


class QuantizedEmbedding(nn.Module):
    """A lookup table [num_embeddings, embedding_dim] as packed integer codes with per-row (per-group) scales.

    Buffers: qweight uint8 [num, packed], scales float16 [num or 1, n_groups], qzeros uint8 (asymmetric only).
    ``embed_scale`` is the factor some embeddings multiply their rows by (Gemma: sqrt(hidden)), applied in the
    output dtype exactly as the module it replaces does.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        per_tensor: bool = False,
        embed_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric, self.per_tensor = bits, group_size, symmetric, per_tensor
        self.embed_scale = embed_scale
        n_groups = group_count(embedding_dim, group_size)
        rows = 1 if per_tensor else num_embeddings
        self.register_buffer("qweight", torch.empty(num_embeddings, packed_length(embedding_dim, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(rows, n_groups, dtype=torch.float16, device=device))
        self.qzeros: torch.Tensor | None
        self.register_buffer("qzeros", None if symmetric else torch.empty(
            rows, packed_length(n_groups, bits), dtype=torch.uint8, device=device))
        # an empty float buffer whose dtype follows model.to(dtype): the dtype rows are dequantized in (never on
        # meta: it holds no data, and a loaded model must not keep a meta tensor)
        anchor_device = "cpu" if torch.device(device).type == "meta" else device
        self.register_buffer("anchor", torch.empty(0, dtype=dtype, device=anchor_device), persistent=False)

    @classmethod
    def from_qweight(cls, qweight: QWeight, embed_scale: float | None, dtype: torch.dtype) -> QuantizedEmbedding:
        module = cls(
            qweight.out_features, qweight.in_features, qweight.bits, qweight.group_size, qweight.symmetric,
            per_tensor=qweight.scale.shape[0] == 1 and qweight.out_features > 1, embed_scale=embed_scale,
            dtype=dtype, device=qweight.codes.device,
        )
        for name, tensor in qweight.pack().items():
            setattr(module, name, tensor)
        return module

    def config(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
            "group_size": self.group_size, "symmetric": self.symmetric, "per_tensor": self.per_tensor,
            "embed_scale": self.embed_scale,
        }

    def _rows(self, rows: torch.Tensor | None) -> QWeight:
        """The packed table (``rows`` None) or the given rows of it, unpacked."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None or t.shape[0] == 1 else t[rows]

        tensors = {"qweight": take(self.qweight), "scales": take(self.scales)}
        if self.qzeros is not None:
            tensors["qzeros"] = take(self.qzeros)
        return QWeight.unpack(tensors, self.bits, self.group_size, self.embedding_dim)

    def unpacked(self) -> QWeight:
        return self._rows(None)

    def float_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole dequantized table [num, dim] in ``dtype``, bit-identical to the rows ``forward`` returns."""
        return self.unpacked().dequantize(dtype)

    def scaled(self, rows: torch.Tensor) -> torch.Tensor:
        if self.embed_scale is None:
            return rows
        return rows * torch.tensor(self.embed_scale, dtype=rows.dtype, device=rows.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._rows(flat).dequantize(self.anchor.dtype)  # [tokens, dim]
        return self.scaled(rows.view(*ids.shape, self.embedding_dim))

    def extra_repr(self) -> str:
        grid = "per-tensor" if self.per_tensor else f"group_size={self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, {grid}, sym={self.symmetric}"


class TiedQuantizedHead(nn.Module):
    """The output head of a model whose head is its input embedding: logits = x @ table^T with the embedding's
    packed table dequantized (no tensors of its own; the embedding is referenced, not owned, so the table is
    neither saved nor moved twice)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._embedding[0]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding.float_table(dtype)

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.float_weight(x.dtype))

    @property
    def group_size(self) -> int:
        return self.embedding.group_size

    def fast_module(self) -> nn.Module:
        """The table on PyTorch's int4 / int8 kernel where its grid fits one (runtime/kernels.py), else dequantized
        once: unpacking the whole vocabulary for every decoded token is the slowest thing a small model would do."""
        from lowbit.runtime.fast import DequantizedLinear
        from lowbit.runtime.weight_only import weight_kernel

        kernel = weight_kernel(self, self.embedding.unpacked())
        return kernel if kernel is not None else DequantizedLinear(self, self.float_weight(self.embedding.anchor.dtype))
