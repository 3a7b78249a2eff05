"""Read tensors one at a time from a folder of safetensors files (sharded or not), never the whole model."""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
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
                        tensor = copied_out(handle.get_tensor(name))
                    except SafetensorError as exc:
                        raise LowbitError(f"cannot read tensor {name!r} from {path}: {exc}; the file is corrupt") from None
                    if tensor.is_floating_point() and not all_finite(tensor):
                        raise LowbitError(
                            f"tensor {name!r} in {self.folder} contains NaN or inf values; the checkpoint is corrupt "
                            "(re-download or re-export it)"
                        )
                    out[name] = tensor
        return out

    def nbytes(self) -> int:
        """Bytes of the weight files (headers included: what the model costs on disk)."""
        return sum(p.stat().st_size for p in set(self._file_of.values()))


FINITE_CHUNK = 1 << 22  # elements checked at a time: isfinite's temporaries on a whole tensor cost ~1.75x its size


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``, checked in slices (on Gemma 3's 671 MB float32 embedding the one-shot check
    raised the process's peak by 1.1 GB)."""
    flat = tensor.reshape(-1)
    widen = flat.element_size() == 1  # float8 (NVFP4's block scales): isfinite has no kernel for it; NaN survives .float()
    return all(bool(torch.isfinite(flat[i : i + FINITE_CHUNK].float() if widen else flat[i : i + FINITE_CHUNK]).all())
               for i in range(0, flat.numel(), FINITE_CHUNK))


COPY_CHUNK = 64 << 20  # bytes copied out of the memory map at a time


@functools.cache
def _madvise():  # noqa: ANN202
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.madvise if hasattr(libc, "madvise") else None
    except OSError:  # not glibc: pages are released when the file is closed instead
        return None


def copied_out(mapped: torch.Tensor) -> torch.Tensor:
    """An owned copy of a tensor backed by the file's memory map, copied a chunk at a time with the pages already
    copied dropped from the map as it goes (madvise DONTNEED: clean file pages, re-read from the file if touched
    again). A plain clone kept every page of the map resident until the file closed: reading Gemma 3's 671 MB
    embedding cost 1.34 GB. Only pages wholly inside the copied range are dropped, so nothing is dropped unread."""
    out = torch.empty_like(mapped, memory_format=torch.contiguous_format)
    if mapped.numel() == 0:
        return out
    if not mapped.is_contiguous():
        return out.copy_(mapped)
    src, dst = mapped.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
    madvise, page = _madvise(), mmap.PAGESIZE
    base = src.data_ptr()
    for start in range(0, src.numel(), COPY_CHUNK):
        end = min(start + COPY_CHUNK, src.numel())
        dst[start:end].copy_(src[start:end])
        if madvise is not None:
            first = -(-base // page) * page  # the first page boundary at or after the tensor's start
            last = (base + end) // page * page  # the last page boundary at or before the copied end
            if last > first:
                madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED
    return out
