"""safetensors shards written one tensor at a time: each tensor's bytes go to the shard file as soon as it is added,
so writing a model costs one tensor of memory, not one shard.

safetensors puts its JSON header (names, dtypes, shapes, byte offsets) before the data, and the header is only
known once the shard's last tensor is. The format allows the header to end in spaces, so a fixed header area is
reserved at the start of each shard, the data appended after it, and the header written into the area when the
shard closes. A shard closes when its data reaches ``shard_bytes`` or its header would outgrow the area.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from lowbit.io.writer import write_index

SHARD_BYTES = 2 << 30
HEADER_BYTES = 256 << 10  # ~2,000 tensor entries; a multiple of 8, so the data starts 8-byte aligned
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class StreamingShardWriter:
    """``add(name, tensor)`` writes the tensor's bytes at once; ``finish()`` closes the last shard and writes the
    index. Shards are ``model-00001.safetensors``, ... in ``folder``."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES, header_bytes: int = HEADER_BYTES) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.header_bytes = header_bytes
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._file: BinaryIO | None = None
        self._name = ""
        self._entries: dict[str, dict] = {}
        self._offset = 0  # bytes of data written to the open shard
        self._header_length = 0  # of the open shard's header as it stands

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                 "data_offsets": [self._offset, self._offset + size]}
        if self._file is not None and (self._offset >= self.shard_bytes or not self._header_fits(name, entry)):
            self._close_shard()
            entry["data_offsets"] = [0, size]
        if self._file is None:
            self._open_shard()
        if tensor.numel():
            self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = entry
        self._header_length += _entry_length(name, entry)
        self._offset += size
        self.weight_map[name] = self._name
        self.total_bytes += size

    def finish(self) -> None:
        if self._file is not None:
            self._close_shard()
        write_index(self.folder, self.weight_map, self.total_bytes)

    def _header(self, entries: dict[str, dict]) -> bytes:
        return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()

    def _header_fits(self, name: str, entry: dict) -> bool:
        return self._header_length + _entry_length(name, entry) <= self.header_bytes

    def _open_shard(self) -> None:
        self._name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        self._file = open(self.folder / self._name, "wb")  # noqa: SIM115 (held open across add() calls)
        self._file.seek(8 + self.header_bytes)
        self._entries, self._offset, self._header_length = {}, 0, len(self._header({}))

    def _close_shard(self) -> None:
        assert self._file is not None
        header = self._header(self._entries)
        if len(header) > self.header_bytes:  # one tensor alone with a name longer than the whole area
            raise ValueError(f"safetensors header of {len(header)} bytes exceeds the reserved {self.header_bytes}")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
        self._file.close()
        self._file = None


def _entry_length(name: str, entry: dict) -> int:
    """Bytes one entry adds to the compact header: ``"name":{...}`` and its comma."""
    return len(json.dumps({name: entry}, separators=(",", ":")).encode()) - 2 + 1
