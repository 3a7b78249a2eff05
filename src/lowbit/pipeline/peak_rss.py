"""This process's peak resident memory, and how it grew phase by phase (no heavy imports: the CLI reads it too).

A phase's figure is the high-water mark (VmHWM) when the phase ends: the phase in which it last rose is where the
run's peak was set. Neither a sampling thread (its wake-ups stall the OpenMP threads of the matmuls: GPTQ on
SmolLM2 took 60 s instead of 54 s with one sampling every 5 ms) nor a reset of the mark per phase (it would also
lower the peak that tools outside the process see: ``/usr/bin/time``, ``wait4``'s ru_maxrss) is used.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the highest reading so far: the kernel reports the larger of its recorded mark and the current resident set, and
# updates the mark lazily, so a later reading can be lower after pages were released (madvise)
_highest = 0


def high_water_bytes() -> int:
    """VmHWM: the peak resident set of this process's own address space (the highest reading so far). getrusage's
    ru_maxrss is the fallback only: a child started by fork + exec inherits its parent's high-water mark in it."""
    global _highest
    reading = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                reading = int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    if reading is None:
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        reading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    _highest = max(_highest, reading)
    return _highest


@contextmanager
def peak_during(into: dict[str, int], phase: str) -> Iterator[None]:
    """Record in ``into[phase]`` the process's high-water mark when the body ends."""
    try:
        yield
    finally:
        into[phase] = high_water_bytes()

