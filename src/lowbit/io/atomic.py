"""Atomic output directories: write into a hidden sibling, rename into place only when everything succeeded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def refuse_non_directory(path: Path, option: str = "--out") -> None:
    """An output folder's path must not be a file; call before any long work starts."""
    if path.exists() and not path.is_dir():
        raise LowbitError(f"output path {path} exists and is not a directory; pick another {option}")


def check_output_dir(final: Path, overwrite: bool) -> None:
    """Refuse an existing output unless asked to overwrite; call before any long work starts."""
    if final.exists() and not overwrite:
        raise LowbitError(f"output directory {final} already exists; pass --overwrite to replace it or pick another --out")
    refuse_non_directory(final)
    parent = final.resolve().parent
    if not parent.exists():
        raise LowbitError(f"parent directory {parent} of the output does not exist; create it first")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the process umask means setting it; put it straight back
    os.umask(mask)
    return mask


def make_readable(folder: Path) -> None:
    """Give every file in ``folder`` the permissions a plain ``open()`` would (0o666 minus the umask). safetensors
    0.8 writes its files 0o600, which a serving engine running as another user cannot read."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final``, on any error (or Ctrl-C)
    it is deleted, so a failed run leaves no half-written output behind."""
    final = Path(final)
    check_output_dir(final, overwrite)
    tmp = final.resolve().parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    make_readable(tmp)
    if final.exists():
        old = final.resolve().parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
