"""Give freed memory back to the operating system between blocks.

glibc keeps freed heap pages for reuse; over 30+ blocks of differently sized activations the resident set then
grows far past what is live. Trimming after each block keeps peak RSS near the real working set.
"""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_freed_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
