"""Read tensors one at a time from a folder of safetensors files (sharded or not), never the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import LowbitError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Lazy name -> tensor access over ``model.safetensors`` or the shards named by its index file.

    Files are opened per read and tensors copied out, so the memory map (whose touched pages count as resident
    memory while it is open) never outlives a read: a released block really frees its memory.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        index = folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise LowbitError(f"{index} is not a valid safetensors index ({exc}); re-export the model") from None
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
            raise LowbitError(
                f"no safetensors weights in {folder} (found: {found}); lowbit reads safetensors only: "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        for path in files:
            with self._open(path) as handle:
                for name in handle.keys():
                    self._file_of[name] = path

    @staticmethod
    def _open(path: Path):
        if not path.exists():
            raise LowbitError(f"checkpoint shard {path} is missing; re-download or re-export the model")
        try:
            return safe_open(str(path), framework="pt")
        except SafetensorError as exc:
            raise LowbitError(
                f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download or re-export it"
            ) from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by name, each file opened once; checked for NaN/inf (a corrupt checkpoint must not
        quantize into garbage silently)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise LowbitError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
            by_file.setdefault(self._file_of[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with self._open(path) as handle:
                for name in file_names:
                    try:
                        tensor = handle.get_tensor(name).clone()
                    except SafetensorError as exc:
                        raise LowbitError(f"cannot read tensor {name!r} from {path}: {exc}; the file is corrupt") from None
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise LowbitError(
                            f"tensor {name!r} in {self.folder} contains NaN or inf values; the checkpoint is corrupt "
                            "(re-download or re-export it)"
                        )
                    out[name] = tensor
        return out

    def nbytes(self) -> int:
        """Bytes of the weight files (headers included: what the model costs on disk)."""
        return sum(p.stat().st_size for p in set(self._file_of.values()))
