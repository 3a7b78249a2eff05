"""Read tensors one at a time from a folder of safetensors files (sharded or not), never the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import LowbitError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Lazy name -> tensor access over ``model.safetensors`` or the shards named by its index file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
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
            for name in self._open(path).keys():
                self._file_of[name] = path

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.exists():
                raise LowbitError(f"checkpoint shard {path} is missing; re-download or re-export the model")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except SafetensorError as exc:
                raise LowbitError(
                    f"cannot read {path}: {exc}; the file is corrupt or truncated, re-download or re-export it"
                ) from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """One tensor, checked for NaN/inf (a corrupt checkpoint must not quantize into garbage silently)."""
        try:
            tensor = self._open(self._file_of[name]).get_tensor(name)
        except KeyError:
            raise LowbitError(f"tensor {name!r} is not in the checkpoint at {self.folder}") from None
        except SafetensorError as exc:
            raise LowbitError(f"cannot read tensor {name!r} from {self.folder}: {exc}; the file is corrupt") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LowbitError(
                f"tensor {name!r} in {self.folder} contains NaN or inf values; the checkpoint is corrupt "
                "(re-download or re-export it)"
            )
        return tensor

    def nbytes(self) -> int:
        """Bytes of tensor data (file sizes, headers included: what the model costs on disk)."""
        return sum(p.stat().st_size for p in set(self._file_of.values()))
