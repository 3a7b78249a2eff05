"""Output safety (io/atomic.py) in real processes: signals, SIGKILL followed by a second run, two runs racing for
one --out, outputs that would destroy their input, failed exports. The invariant everywhere: exit 0 with the
output, or a one-line error with the disk as it was (no partial folder, no lock file, the input untouched)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.cli.main import main

# The child runs the real CLI; its block writer waits for a flag file, so the test can act while the partial
# output exists (a tiny model would otherwise finish before any signal arrives).
CHILD = """
import os, sys, time
from pathlib import Path
import lowbit.io.writer as writer
flag = Path(sys.argv[1])
original = writer.ShardWriter.write
def wait_then_write(self, filename, tensors):
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.02)
    return original(self, filename, tensors)
writer.ShardWriter.write = wait_then_write
from lowbit.cli.main import main
sys.exit(main(["--quiet", *sys.argv[2:]]))
"""


def start_paused(flag: Path, *argv: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(flag), *map(str, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def wait_for_partial(parent: Path, name: str, child: subprocess.Popen) -> Path:
    deadline = time.time() + 60
    while time.time() < deadline:
        found = list(parent.glob(f".{name}.partial-{child.pid}"))
        if found:
            return found[0]
        assert child.poll() is None, child.communicate()
        time.sleep(0.02)
    raise AssertionError("the child never started writing")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_mid_write_leaves_nothing(toy_folder, tmp_path, sig, code):
    child = start_paused(tmp_path / "go", "quantize", "--model", toy_folder(), "--recipe", "w8", "--out", tmp_path / "q")
    wait_for_partial(tmp_path, "q", child)
    child.send_signal(sig)
    # let the writer go on: Python drops a signal's exception that lands in a finaliser (__del__), and the output
    # must then still not be committed
    (tmp_path / "go").touch()
    _, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("lowbit: ")
    assert not (tmp_path / "q").exists() and hidden(tmp_path) == []


def test_after_sigkill_the_next_run_cleans_up_and_succeeds(toy_folder, tmp_path):
    child = start_paused(tmp_path / "go", "quantize", "--model", toy_folder(), "--recipe", "w8", "--out", tmp_path / "q")
    partial = wait_for_partial(tmp_path, "q", child)
    child.kill()
    child.wait(timeout=60)
    assert partial.exists()  # nothing can catch SIGKILL
    assert main(["--quiet", "quantize", "--model", str(toy_folder()), "--recipe", "w8", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "lowbit_config.json").exists() and hidden(tmp_path) == []


def test_two_runs_on_one_out_the_second_is_refused(toy_folder, tmp_path):
    flag = tmp_path / "go"
    first = start_paused(flag, "quantize", "--model", toy_folder(), "--recipe", "w8", "--out", tmp_path / "q")
    wait_for_partial(tmp_path, "q", first)
    second = subprocess.run(
        [sys.executable, "-m", "lowbit.cli.main", "--quiet", "quantize", "--model", str(toy_folder()), "--recipe",
         "w4g128", "--out", str(tmp_path / "q"), "--overwrite"], capture_output=True, text=True,
    )
    assert second.returncode == 2 and "being written by another lowbit process" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    flag.touch()
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert '"w8"' in (tmp_path / "q" / "lowbit_config.json").read_text()  # the first run's output, whole
    assert hidden(tmp_path) == []


def test_out_that_would_destroy_the_input_is_refused(toy_folder, tmp_path, capsys, monkeypatch):
    source = toy_folder()
    before = sorted(p.name for p in source.iterdir())
    for out, message in ((source, "is the input"), (source.parent, "contains the input")):
        code = main(["--quiet", "quantize", "--model", str(source), "--recipe", "w8", "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    monkeypatch.chdir(tmp_path)
    code = main(["--quiet", "quantize", "--model", str(source), "--recipe", "w8", "--out", ".", "--overwrite"])
    assert code == 2 and "current folder" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == before and list(tmp_path.iterdir()) == []


def test_a_failed_gguf_export_leaves_the_earlier_file(tmp_path, capsys, monkeypatch):
    import gguf

    from lowbit import GPTQ, WeightQuant
    from test_export import quantized_folder

    folder = quantized_folder(tmp_path, [GPTQ(WeightQuant(bits=8, symmetric=True, group_size=32))], biases=False)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    code = main(["--quiet", "export", str(folder), "--format", "gguf", "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"an earlier export" and hidden(tmp_path) == []
    (tmp_path / "exports").mkdir()
    code = main(["--quiet", "export", str(folder), "--format", "gguf", "--out", str(tmp_path / "exports"), "--overwrite"])
    assert code == 2 and "is a folder" in capsys.readouterr().err


def test_a_stopped_parent_stops_its_child_and_waits_for_it(tmp_path):
    """compare and bench run lowbit children: stopping the parent stops the child, which then cleans up itself."""
    from lowbit.cli.common import run_child
    from lowbit.io.atomic import Terminated

    cleaned = tmp_path / "child-cleaned-up"
    child = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(cleaned)!r}, 'w').close(), sys.exit(143)))\n"
        "time.sleep(60)\n"
    )

    def stop_parent(signum, frame):
        raise Terminated(signal.SIGTERM)

    previous = signal.signal(signal.SIGALRM, stop_parent)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.time()
    try:
        with pytest.raises(Terminated):
            run_child([sys.executable, "-c", child], "a child")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert cleaned.exists() and time.time() - started < 30


def test_an_unwritable_output_folder_is_one_line(toy_folder, tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom permissions do not apply: the file system's refusal is simulated."""
    import lowbit.io.atomic as atomic

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    source = toy_folder()
    capsys.readouterr()  # transformers' progress bar while the fixture saved the toy
    monkeypatch.setattr(atomic.os, "open", read_only)
    code = main(["--quiet", "quantize", "--model", str(source), "--recipe", "w8", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "Read-only file system" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
