"""Output safety: the one module every lowbit writer goes through (quantize, save, compare, inspect, bench, the
GGUF import cache, the GGUF and compressed-tensors exports).

What holds for an output ``OUT``:
  * it is checked before any work: never the input, inside-out (a folder that contains the input), the current
    folder or one of its parents; an existing ``OUT`` only with ``overwrite``; its parent must exist;
  * one writer at a time: an exclusive ``flock`` on ``.OUT.lock`` beside it, held from the start of the work to the
    final rename (a second run on the same ``OUT`` fails at once with one line instead of silently replacing it);
  * all or nothing: data goes to a hidden sibling ``.OUT.partial-PID`` renamed into place only on success; on an
    error, Ctrl-C, SIGTERM or SIGHUP the partial is removed; after a SIGKILL (which nothing can catch) the next
    run on ``OUT`` removes it, because under the lock every partial of ``OUT`` belongs to a dead writer;
  * a full disk, a read-only folder or a permission error while writing ends in one line, not a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

_STALE_KINDS = ("partial", "old")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised like KeyboardInterrupt so every ``finally`` and cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_as_exceptions() -> Iterator[list[int]]:
    """While inside, SIGINT raises KeyboardInterrupt and SIGTERM / SIGHUP raise ``Terminated`` (their default
    action kills the process without running any cleanup). Yields the signals received: Python drops an exception
    raised while a finaliser (``__del__``) runs, so a writer checks this list before it commits its output.
    Handlers are restored on exit; outside the main thread Python cannot install them, so nothing changes there."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        raise_for_signal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_for_signal(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def refuse_non_directory(path: Path, option: str = "--out") -> None:
    """An output folder's path must not be a file; call before any long work starts."""
    if path.exists() and not path.is_dir():
        raise LowbitError(f"output path {path} exists and is not a directory; pick another {option}")


def refuse_unsafe_target(final: Path, inputs: Sequence[Path] = (), option: str = "--out") -> None:
    """``final`` must not be an input, contain an input, or be the current folder or one of its ancestors: replacing
    any of those destroys what the run reads (or fails half-way with EBUSY)."""
    target = final.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise LowbitError(f"{option} {final} is the current folder or one of its parents; name a new folder for the output")
    for source in inputs:
        source = Path(source).resolve()
        if target == source or target in source.parents:
            what = "is" if target == source else "contains"
            raise LowbitError(f"{option} {final} {what} the input {source}; write the output somewhere else")


def check_output_dir(final: Path, overwrite: bool, inputs: Sequence[Path] = (), option: str = "--out") -> None:
    """Refuse an output folder that would destroy an input or an existing output (unless ``overwrite``); call
    before any long work starts."""
    refuse_unsafe_target(final, inputs, option)
    if final.exists() and not overwrite:
        raise LowbitError(f"output directory {final} already exists; pass --overwrite to replace it or pick another {option}")
    refuse_non_directory(final, option)
    _check_parent(final)


def check_output_file(final: Path, overwrite: bool, inputs: Sequence[Path] = (), option: str = "--out") -> None:
    """The same checks for an output that is one file (a GGUF)."""
    refuse_unsafe_target(final, inputs, option)
    if final.is_dir():
        raise LowbitError(f"{option} {final} is a folder; name the output file, e.g. {final / 'model.gguf'}")
    if final.exists() and not overwrite:
        raise LowbitError(f"{final} exists; pass --overwrite to replace it or pick another {option}")
    _check_parent(final)


def _check_parent(final: Path) -> None:
    parent = final.resolve().parent
    if not parent.is_dir():
        raise LowbitError(f"parent directory {parent} of the output does not exist; create it first")


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


@contextmanager
def exclusive_lock(final: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``final`` exclusively; another process asking for it gets a LowbitError at once
    (or, with ``wait``, blocks until it is free: for a shared cache entry two runs may convert at once). The lock file is removed on release; the kernel releases the lock itself when its holder dies (even by
    SIGKILL), so a stale file never blocks the next run."""
    lock_path = final.parent / f".{final.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only or full file system, a folder this user cannot write
            raise LowbitError(f"cannot write in {final.parent}: {exc.strerror}; pick a writable location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LowbitError(
                f"{final} is being written by another lowbit process (pid {holder}); wait for it to end or pick "
                "another output"
            ) from None
        # the previous holder may have unlinked the file between our open and flock: then we hold a dead inode
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.unlink(lock_path)
        os.close(fd)


def remove_stale_partials(final: Path) -> None:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` siblings of ``final``: call only while holding its lock, when
    each of them was left by a writer that died (SIGKILL, power loss)."""
    for kind in _STALE_KINDS:
        for stale in final.parent.glob(f".{final.name}.{kind}-*"):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the process umask means setting it; put it straight back
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give ``path`` (a file, or every file in a folder) the permissions a plain ``open()`` would (0o666 minus the
    umask). safetensors 0.8 writes its files 0o600, which a serving engine running as another user cannot read."""
    mode = 0o666 & ~_umask()
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file():
            file.chmod(mode)


@contextmanager
def _guarded(final: Path, tmp: Path) -> Iterator[list[int]]:
    """Signals become exceptions; any failure removes ``tmp``; OS write errors become one line. Yields the signals
    received (see ``signals_as_exceptions``): the caller checks them before it renames."""
    with signals_as_exceptions() as received:
        try:
            yield received
        except BaseException as exc:
            _remove(tmp)
            if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
                where = f" ({exc.filename})" if exc.filename else ""
                raise LowbitError(
                    f"cannot write {final}: {exc.strerror}{where}; free space or pick a writable location, "
                    "nothing was left behind"
                ) from None
            raise


def _replace(tmp: Path, final: Path, overwrite: bool, received: list[int]) -> None:
    """Move ``tmp`` to ``final``, unless a signal arrived whose exception Python dropped; an existing ``final``
    (only with ``overwrite``, re-checked under the lock: it may have appeared since the first check) is moved aside
    first and removed after."""
    if received:
        raise_for_signal(received[0])
    make_readable(tmp)
    if final.exists() or final.is_symlink():
        if not overwrite:
            _remove(tmp)
            raise LowbitError(f"{final} appeared while this run was writing it; pass --overwrite or pick another output")
        old = _sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_directory(
    final: Path, overwrite: bool = False, inputs: Sequence[Path] = (), wait: bool = False
) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final``, on any error or signal it
    is removed, so a failed run leaves the disk as it was. ``wait``: queue behind another writer of ``final``."""
    final = Path(final)
    check_output_dir(final, overwrite, inputs)
    with exclusive_lock(final, wait):
        remove_stale_partials(final)
        tmp = _sibling(final, "partial")
        with _guarded(final, tmp) as received:
            tmp.mkdir()
            yield tmp
            _replace(tmp, final, overwrite, received)


@contextmanager
def atomic_file(final: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a hidden path beside ``final`` to write one file to; renamed into place on success, removed on any
    error or signal."""
    final = Path(final)
    check_output_file(final, overwrite, inputs)
    with exclusive_lock(final):
        remove_stale_partials(final)
        tmp = _sibling(final, "partial")
        with _guarded(final, tmp) as received:
            yield tmp
            _replace(tmp, final, overwrite, received)


@contextmanager
def report_folder(folder: Path, inputs: Sequence[Path] = (), option: str = "--out") -> Iterator[Path]:
    """A folder that collects report files over a run (compare, inspect, bench): kept between runs (compare
    resumes from it), so it is not replaced whole; it is checked like any output, locked for the run, and each
    file in it is written with ``write_text_atomic`` / ``write_json_atomic``."""
    folder = Path(folder)
    refuse_unsafe_target(folder, inputs, option)
    refuse_non_directory(folder, option)
    with signals_as_exceptions():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LowbitError(f"cannot create {option} {folder}: {exc.strerror}; pick a writable location") from None
        with exclusive_lock(folder):
            yield folder


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a file into a temporary sibling, then rename it to ``path``: an interrupted run never leaves
    a truncated file (for files inside a ``report_folder``; a whole output uses ``atomic_file``)."""
    tmp = _sibling(path, "partial")
    with _guarded(path, tmp) as received:
        write(tmp)
        if received:
            raise_for_signal(received[0])
        make_readable(tmp)
        os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
