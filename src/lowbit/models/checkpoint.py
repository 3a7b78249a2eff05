"""Read tensors one at a time from a folder of safetensors files (sharded or not), never the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import LowbitError

INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a safetensors index, checked for shape."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise LowbitError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); re-export the model") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise LowbitError(f"{index}: 'weight_map' must map tensor names to shard file names; re-export the model")
    return weight_map


def shard_path(folder: Path, name: str) -> Path:
    """A shard named by an index: a path inside ``folder``, never elsewhere (an index naming '../x' or '/etc/x'
    would make lowbit read files the model folder does not hold). Checked on the name, not the resolved path:
    Hugging Face's cache folders hold their shards as symlinks into a blob store."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise LowbitError(f"{folder / INDEX_FILE} names shard {name!r} outside the model folder; re-export the model")
    return folder / relative


class CheckpointReader:
    """Lazy name -> tensor access over ``model.safetensors`` or the shards named by its index file.

    Files are opened per read and tensors copied out, so the memory map (whose touched pages count as resident
    memory while it is open) never outlives a read: a released block really frees its memory.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file_of: dict[str, Path] = {}
        self._shape_of: dict[str, tuple[int, ...]] = {}
        index = folder / INDEX_FILE
        if index.exists():
            files = sorted({shard_path(folder, f) for f in read_weight_map(index).values()})
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
                    self._shape_of[name] = tuple(handle.get_slice(name).get_shape())

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

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as the file's header states it (nothing is read)."""
        return self._shape_of[name]

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
