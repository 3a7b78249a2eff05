"""The tensors outside the decoder blocks, packed: the input embedding table (looked up, then only the rows asked
for are dequantized, so its memory stays packed) and a head tied to it (the same packed table, multiplied).

The table is on an integer grid (``QuantizedEmbedding``) or on a llama.cpp K-quant grid (``KQuantEmbedding``: the
types llama-quantize gives token_embd and output in its mixes). An untied head is a runtime Linear like any other
(``WeightOnlyLinear``, ``KQuantLinear``). A tied head has no tensors of its own: the
checkpoint stores the table once, as the embedding's, and ``TiedQuantizedHead`` reads it from the embedding module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics.grid import group_count
from lowbit.numerics.kquant import K_TYPES, KQWeight
from lowbit.numerics.packing import packed_length
from lowbit.numerics.qweight import QWeight
from lowbit.runtime.kquant_linear import register_k_levels
from lowbit.runtime.weight_only import filled


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
        self._register_anchor(dtype, device)

    def _register_anchor(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """An empty float buffer whose dtype follows model.to(dtype): the dtype rows are dequantized in (never on
        meta: it holds no data, and a loaded model must not keep a meta tensor)."""
        anchor_device = "cpu" if torch.device(device).type == "meta" else device
        self.register_buffer("anchor", torch.empty(0, dtype=dtype, device=anchor_device), persistent=False)

    @classmethod
    def from_qweight(cls, qweight: QWeight, embed_scale: float | None, dtype: torch.dtype) -> QuantizedEmbedding:
        module = cls(
            qweight.out_features, qweight.in_features, qweight.bits, qweight.group_size, qweight.symmetric,
            per_tensor=qweight.scale.shape[0] == 1 and qweight.out_features > 1, embed_scale=embed_scale,
            dtype=dtype, device=qweight.codes.device,
        )
        return filled(module, qweight.pack(), None)

    def config(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
            "group_size": self.group_size, "symmetric": self.symmetric, "per_tensor": self.per_tensor,
            "embed_scale": self.embed_scale,
        }

    def _rows(self, rows: torch.Tensor | None) -> QWeight | KQWeight:
        """The packed table (``rows`` None) or the given rows of it, unpacked."""
        tensors = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            tensors["qzeros"] = self.qzeros
        return QWeight.unpack(_take(tensors, rows), self.bits, self.group_size, self.embedding_dim)

    def unpacked(self) -> QWeight | KQWeight:
        return self._rows(None)

    def kernel_weights(self) -> QWeight | None:
        """The table as the int4 / int8 kernels take it (a tied head's fast form), or None where none fits."""
        table = self.unpacked()
        assert isinstance(table, QWeight)  # an integer grid here; KQuantEmbedding answers None
        return table

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


def _take(tensors: dict[str, torch.Tensor], rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The given ``rows`` of every per-row tensor (one of a single row is shared by all: a per-tensor scale)."""
    return {k: t if rows is None or t.shape[0] == 1 else t[rows] for k, t in tensors.items()}


class KQuantEmbedding(QuantizedEmbedding):
    """A lookup table [num_embeddings, embedding_dim] on a llama.cpp K-quant grid (numerics/kquant.py), stored as
    ``KQuantLinear`` stores its weight, so the GGUF export copies the blocks exactly.

    Buffers: qweight uint8 [num, packed], kd float16 [num, dim / 256], ksc int8 [num, dim / sub], kdmin float16 and
    km int8 likewise (asymmetric types only)."""

    kdmin: torch.Tensor | None
    km: torch.Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ggml: str,
        embed_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
    ) -> None:
        nn.Module.__init__(self)  # QuantizedEmbedding's per-group scales are not this grid's
        kt = K_TYPES[ggml]
        self.num_embeddings, self.embedding_dim, self.ggml = num_embeddings, embedding_dim, ggml
        self.bits, self.group_size, self.symmetric, self.per_tensor = kt.bits, kt.sub, not kt.asymmetric, False
        self.embed_scale = embed_scale
        self.register_buffer("qweight", torch.empty(num_embeddings, packed_length(embedding_dim, kt.bits),
                                                    dtype=torch.uint8, device=device))
        register_k_levels(self, num_embeddings, embedding_dim, kt, device)
        self._register_anchor(dtype, device)

    @classmethod
    def from_qweight(cls, qweight: QWeight | KQWeight, embed_scale: float | None, dtype: torch.dtype) -> KQuantEmbedding:
        assert isinstance(qweight, KQWeight)
        module = cls(qweight.out_features, qweight.in_features, qweight.kind, embed_scale=embed_scale, dtype=dtype,
                     device=qweight.codes.device)
        return filled(module, qweight.pack(), None)

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "ggml": self.ggml,
                "embed_scale": self.embed_scale}

    def _rows(self, rows: torch.Tensor | None) -> KQWeight:
        tensors = {"qweight": self.qweight, "kd": self.kd, "ksc": self.ksc}
        if self.kdmin is not None and self.km is not None:
            tensors.update(kdmin=self.kdmin, km=self.km)
        return KQWeight.unpack(_take(tensors, rows), self.ggml, self.embedding_dim)

    def kernel_weights(self) -> None:
        """None: no int4 / int8 kernel holds a K grid's codes (a tied head computes with the dequantized table)."""
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml}"


def quantized_embedding(qweight: QWeight | KQWeight, embed_scale: float | None, dtype: torch.dtype) -> QuantizedEmbedding:
    """The runtime table holding a rounded embedding: KQuantEmbedding for a K grid, else QuantizedEmbedding."""
    cls = KQuantEmbedding if isinstance(qweight, KQWeight) else QuantizedEmbedding
    return cls.from_qweight(qweight, embed_scale, dtype)


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

        table = self.embedding.kernel_weights()
        kernel = weight_kernel(self, table) if table is not None else None
        return kernel if kernel is not None else DequantizedLinear(self, self.float_weight(self.embedding.anchor.dtype))
