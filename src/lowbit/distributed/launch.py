"""`lowbit quantize --nproc N`: start N ranks of the same command on this machine, as torchrun would, and end the
run as one program: rank 0's output and progress are shown, a failure is one line (the rank that failed first,
its own error), and a rank that fails or dies stops every other rank, which removes its partial output.

Each rank is `python -m lowbit.cli.main ARGS` with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and OMP_NUM_THREADS = cores / N unless set: N ranks with all cores each would fight
over them. Across several machines use torchrun itself (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowbit.io.atomic import exclusive_lock, remove_stale_partials, signals_as_exceptions

# the environment variable naming the file a rank writes its one-line error into (cli/main.py) instead of stderr
ERROR_FILE_ENV = "LOWBIT_ERROR_FILE"
ERROR_PREFIX = "lowbit: error: "
LOST_CONTACT = "lost contact with another rank"
GRACE_SECONDS = 3.0  # after the first failure: time for the other ranks to end by themselves (the same error)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
KILL_AFTER_SECONDS = 10.0  # after SIGTERM: time for a rank to remove its partial output and exit


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, error_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{ERROR_FILE_ENV: str(error_file)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(argv: list[str], nproc: int, out: Path) -> int:
    """Run `lowbit ARGV` as ``nproc`` ranks writing ``out``; returns the exit code the whole run ends with."""
    port = free_port()
    # SIGTERM / SIGHUP to this launcher become exceptions, so the ranks are stopped too (not orphaned)
    with signals_as_exceptions(), tempfile.TemporaryDirectory(prefix="lowbit-ranks-") as scratch:
        folder = Path(scratch)
        ranks: list[subprocess.Popen] = []
        logs = []
        try:
            for r in range(nproc):
                # rank 0 speaks for the run (results on stdout, progress on stderr); the others' stderr is kept
                # to explain a crash that left no error line
                log = None if r == 0 else open(folder / f"stderr-{r}", "w")  # noqa: SIM115 (closed below)
                logs.append(log)
                ranks.append(subprocess.Popen(
                    [sys.executable, "-m", "lowbit.cli.main", *argv],
                    env=rank_env(r, nproc, port, folder / f"error-{r}"),
                    stdout=None if r == 0 else subprocess.DEVNULL, stderr=log, preexec_fn=_end_with_parent,
                ))
            first = _wait_for_first_failure(ranks)
            if first is None:
                return 0
            _stop_the_rest(ranks, out)
        except BaseException:  # Ctrl-C, SIGTERM: every rank is stopped and removes its partial output
            _stop_the_rest(ranks, out)
            raise
        finally:
            for log in logs:
                if log is not None:
                    log.close()
        rank, code, message = _first_cause(ranks, folder, first)
        print(f"lowbit: error: rank {rank} of {nproc}: {message}", file=sys.stderr)
        return code


def _end_with_parent() -> None:
    """In each rank (Linux): SIGTERM when the launcher dies, even by SIGKILL, so no rank runs on unwatched (and
    rank 0 removes its partial output). Elsewhere nothing: the launcher's own signal handling still stops them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _wait_for_first_failure(ranks: list[subprocess.Popen]) -> int | None:
    """The rank that ended with a failure first, or None once every rank has succeeded."""
    while True:
        codes = [p.poll() for p in ranks]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.05)


def _stop_the_rest(ranks: list[subprocess.Popen], out: Path) -> None:
    """Let the other ranks end by themselves for a moment, then SIGTERM them (each removes its partial output);
    a rank blocked inside a collective or the rendezvous (C++ code, where Python's signal handler cannot run) is
    killed after a while, and the partial output rank 0 could not remove is removed here."""
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and any(p.poll() is None for p in ranks):
        time.sleep(0.05)
    for p in ranks:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    killed = False
    for p in ranks:
        try:
            p.wait(timeout=KILL_AFTER_SECONDS)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            killed = True
    if killed or ranks[0].returncode < 0:  # rank 0 died by a signal (SIGKILL, SIGABRT, SIGSEGV) mid-write
        with exclusive_lock(out):  # free now: its holder is dead
            remove_stale_partials(out)


def _first_cause(ranks: list[subprocess.Popen], folder: Path, first: int) -> tuple[int, int, str]:
    """(rank, exit code, message) of the failure to report: an error of the rank's own (not a lost connection,
    which is a consequence) from the lowest such rank, else the first rank that failed."""
    messages = {}
    for r, p in enumerate(ranks):
        path = folder / f"error-{r}"
        line = path.read_text().strip() if p.returncode not in (0, None) and path.is_file() else ""
        if line:
            messages[r] = line
    # "lowbit: stopped by SIGTERM" is this launcher's doing; a lost connection is another rank's failure: the cause
    # is a rank's own error, else a rank that ended without a line (a signal, a crash), else the first failure
    own = [r for r in sorted(messages) if messages[r].startswith(ERROR_PREFIX) and LOST_CONTACT not in messages[r]]
    silent = [r for r, p in enumerate(ranks) if p.returncode not in (0, None) and r not in messages
              and p.returncode != -signal.SIGTERM]
    rank = (own or ([first] if first in silent else silent) or [first])[0]
    code = ranks[rank].returncode or 1
    if rank in messages:
        return rank, code if code > 0 else 1, messages[rank].removeprefix(ERROR_PREFIX)
    if code < 0:
        return rank, 128 - code, f"ended by {signal.Signals(-code).name}; no output was written"
    stderr = folder / f"stderr-{rank}"
    last = stderr.read_text().strip().splitlines()[-1:] if stderr.is_file() else []
    detail = f": {last[0][:200]}" if last else ""
    return rank, code, f"exited with code {code}{detail}; no output was written"


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the ranks it starts run the command itself)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
