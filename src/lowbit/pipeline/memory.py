"""Give freed memory back to the operating system.

glibc keeps freed heap pages for reuse. Worse, its mmap threshold is dynamic: once a large block is freed, later
allocations up to 32 MiB (activation-sized tensors) come from the heap, where freed memory stays resident until a
trim. Measured on SmolLM2-135M (RTN, 64 x 512 calibration tokens): peak RSS 988 MiB with glibc's defaults, 789 MiB with
a fixed 1 MiB threshold, while the live working set after each block is ~475 MiB. The CLI, which owns its
process, fixes the threshold (``prefer_mmap_for_large_allocations``); trimming after each block keeps RSS between
blocks near the working set.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
# 32 MiB, glibc's own ceiling for its dynamic threshold. At 1 MiB every activation of a block pass (8 x 512 x 1536
# float32 = 25 MB) was a fresh mmap, page-faulted and zeroed on each use: GPTQ on SmolLM2 spent 43 s in the kernel
# and took 96.5 s in the block loop; at 32 MiB 8 s and 74.6 s, for a peak RSS of 859 MiB instead of 800 MiB.
MMAP_THRESHOLD_BYTES = 32 << 20


def prefer_mmap_for_large_allocations() -> None:
    """Serve every allocation above 32 MiB with its own mmap, returned to the OS as soon as it is freed. Setting the
    threshold explicitly also switches off glibc's dynamic raising of it. Process-wide: for entry points only."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Keep every object alive now (imported modules, the model skeleton) out of the collector's reach while the
    block loop runs: its per-block ``gc.collect`` then scans only what the loop created (unfrozen, it took 0.2 s a
    block, 40% of a data-free run on SmolLM2, scanning transformers' import-time objects). Unfrozen afterwards, so
    nothing that dies later escapes collection."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_freed_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def block_memory_bytes(device: torch.device | str) -> int:
    """What one block cost: the GPU's peak allocation since ``reset_peak_memory`` on CUDA, else this process's
    resident set now (on CPU the working set is the whole process; a growing figure means a leak)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resident_bytes()


def resident_bytes() -> int:
    """This process's resident set size now."""
    return int(psutil.Process().memory_info().rss)
