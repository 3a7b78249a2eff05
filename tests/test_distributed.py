"""Data-parallel calibration (distributed/): two gloo ranks give one process's result for every method; a failing
rank ends the run everywhere with no output; ranks given different inputs are refused; `--nproc` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import distributed_worker
from lowbit.distributed.divide import owners
from lowbit.distributed.launch import strip_nproc
from lowbit.pipeline.observers import TokenSampleObserver
from toy import save_toy, write_corpus

# every method, and the compositions that route statistics differently (AWQ then GPTQ, pruning then rounding)
METHOD_RECIPES = (
    "w4g128", "gptq-w4g128", "gptq-w4g128-actorder", "awq-w4g128", "awq-gptq-w4g128", "w8a8-token",
    "awq-gptq-w4g128-imse",  # AWQ judging its scales on the searched grid, then GPTQ on it
    "smoothquant-all-w8a8-static", "llm-int8", "magnitude-50", "wanda-50", "wanda-2of4-w4g128", "sparsegpt-50",
    "gptq-w4g128-e6",  # the head rounded by GPTQ from its inputs, reduced over ranks
    "rotate-gptq-w4a8",  # rank 0 proves each block's rotation, the others follow it
)
# recipes whose result depends on no floating-point sum over tokens: identical bytes on any number of ranks
EXACT = {"w4g128", "w8a8-token", "magnitude-50", "llm-int8"}


def spawn(tmp_path: Path, scenario: str, payload: dict, world: int = 2) -> list[dict]:
    """``world`` ranks of ``distributed_worker.run``; returns each rank's outcome."""
    mp.spawn(distributed_worker.run, args=(world, str(tmp_path / "rendezvous"), scenario, str(tmp_path), payload),
             nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(world)]


def test_two_ranks_give_one_process_weights_for_every_method(tmp_path: Path) -> None:
    runs = [("llama", r) for r in METHOD_RECIPES] + [("qwen2_moe", "gptq-w4g128"), ("qwen2_moe", "awq-w4g128")]
    check_against_one_process(tmp_path, runs, world=2, options={})


def test_three_ranks_uneven_batches_sampling_and_replay(tmp_path: Path) -> None:
    """12 sequences in batches of 1 on 3 ranks: the measured batches (the first 8) and AWQ's replayed calls (the
    first 4) and its 32-row clip sample all span ranks unevenly."""
    runs = [("llama", r) for r in ("awq-sampled", "awq-gptq-sampled", "gptq-w4g128", "smoothquant-static")]
    check_against_one_process(tmp_path, runs, world=3, options={"n_sequences": 12, "batch_size": 1})


def check_against_one_process(tmp_path: Path, runs: list[tuple[str, str]], world: int, options: dict) -> None:
    outcomes = spawn(tmp_path, "methods", {"runs": runs, "options": options}, world=world)
    assert all(o["ok"] for o in outcomes), outcomes
    results = torch.load(tmp_path / "results.pt")
    for model_type, recipe in runs:
        key = f"{model_type}/{recipe}"
        two, one = results[key], distributed_worker.quantized_state(model_type, recipe, **options)
        assert two["state"].keys() == one["state"].keys(), key
        for name, reference in one["state"].items():
            got = two["state"][name]
            if recipe in EXACT:
                assert torch.equal(got, reference), f"{key}: {name} differs"
            elif reference.is_floating_point():
                # a Hessian or mean summed in another order: float32 rounding noise, nothing more
                torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5, msg=f"{key}: {name}")
            else:  # packed codes: a sum's last bit may flip a rounding decision, rarely (8 codes per int32 word)
                same = (got == reference).float().mean().item()
                assert same >= 0.98, f"{key}: {name} packed words agree on only {same:.2%}"
        # the models compute the same function: logits within a small fraction of their spread
        spread = one["logits"].std().item()
        assert (two["logits"] - one["logits"]).abs().max().item() <= 0.01 * spread, key
        torch.testing.assert_close(torch.tensor(two["block_errors"]), torch.tensor(one["block_errors"]),
                                   rtol=1e-2, atol=1e-6, msg=key)


def test_ranks_given_different_inputs_are_refused(tmp_path: Path) -> None:
    outcomes = spawn(tmp_path, "mismatch", {"0": {}, "1": {"calibration_seed": 1}})
    for o in outcomes:
        assert not o["ok"] and o["type"] == "LowbitError", o
        assert "calibration ids differs (ranks 0 vs ranks 1)" in o["message"], o["message"]


def test_ranks_with_different_weights_are_refused(tmp_path: Path) -> None:
    outcomes = spawn(tmp_path, "mismatch", {"0": {}, "1": {"seed": 1}})
    for o in outcomes:
        assert not o["ok"] and "different model weights" in o["message"], o


def test_a_failing_rank_ends_every_rank_and_leaves_no_output(tmp_path: Path) -> None:
    source = save_toy("llama", tmp_path / "toy")
    out = tmp_path / "out"
    outcomes = spawn(tmp_path, "failure", {"source": str(source), "out": str(out)})
    assert outcomes[1] == {"ok": False, "type": "LowbitError", "message": "injected failure on rank 1; nothing to fix"}
    assert not outcomes[0]["ok"] and outcomes[0]["type"] == "RankLost", outcomes[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "a failed distributed run left output behind"


class TwoRanksByHand:
    """``gather`` as rank 0 of two sees it, with rank 1's contribution given."""

    def __init__(self, other: object) -> None:
        self.other = other

    def gather(self, obj: object) -> list:
        return [obj, self.other]


@pytest.mark.parametrize("first_positions", [0, 2])
def test_token_sample_of_two_ranks_is_the_one_process_sample(first_positions: int) -> None:
    batches = [torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(b)) for b in range(5)]
    one = TokenSampleObserver(max_tokens=40, seed=3, first_positions=first_positions)
    for x in batches:
        one.add_batch(x)
    assert one.rows.shape[0] == 40 + 5 * 2 * first_positions  # every sequence's first positions, kept besides
    rank0 = TokenSampleObserver(40, seed=3, first_positions=first_positions)
    rank1 = TokenSampleObserver(40, seed=3, first_positions=first_positions)
    for b, x in enumerate(batches):  # rank b % 2 runs batch b; the other draws (and drops) its keys
        (rank0 if b % 2 == 0 else rank1).add_batch(x)
        if b < len(batches) - 1:  # as in taps.run_with_taps: a rank skips only the batches before its own next one
            (rank1 if b % 2 == 0 else rank0).skip_batch(x.shape[0] * x.shape[1])
    rank0.reduce(TwoRanksByHand((rank1.rows, rank1.keys, rank1.rows_seen)))
    assert torch.equal(rank0.rows, one.rows) and torch.equal(rank0.keys, one.keys)
    assert torch.equal(rank0.weights, one.weights)


def test_work_is_divided_longest_first_and_identically_everywhere() -> None:
    assert owners([1, 9, 4, 4], 2) == [1, 0, 1, 1]  # 9 -> rank 0; 4, 4 -> rank 1 (load 8); 1 -> rank 1 (8 < 9)
    assert owners([5.0] * 3, 1) == [0, 0, 0]
    assert strip_nproc(["quantize", "--nproc", "2", "--out", "x", "--nproc=3"]) == ["quantize", "--out", "x"]


def lowbit(*args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", "--quiet", *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("toy")
    return save_toy("llama", folder / "toy"), write_corpus(folder / "corpus.txt")


def quantize_args(toy: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(toy), "--calib", str(corpus), "--nsamples", "8", "--seq-len", "32",
            "--batch-size", "2", "--out", str(out), *extra]


def test_nproc_writes_the_one_process_checkpoint(toy_folder: tuple[Path, Path], tmp_path: Path) -> None:
    toy, corpus = toy_folder
    one = lowbit(*quantize_args(toy, corpus, tmp_path / "one", "--recipe", "w4g128", "--measure"))
    two = lowbit(*quantize_args(toy, corpus, tmp_path / "two", "--recipe", "w4g128", "--measure", "--nproc", "2",
                                "--json"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert json.loads(two.stdout)["out"] == str(tmp_path / "two")  # rank 0 speaks for the run, once
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for name in shards:  # RTN: the same bytes
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_nproc_error_on_every_rank_is_one_line(toy_folder: tuple[Path, Path], tmp_path: Path) -> None:
    toy, corpus = toy_folder
    # 2 sequences in batches of 2: one batch for two ranks; every rank finds it and exits 2, the launcher says it once
    few = lowbit(*quantize_args(toy, corpus, tmp_path / "few", "--recipe", "gptq-w4g128", "--nproc", "2",
                                "--nsamples", "2"))
    lines = few.stderr.strip().splitlines()
    assert few.returncode == 2 and len(lines) == 1, few.stderr
    assert lines[0].startswith("lowbit: error: rank 0 of 2: 2 calibration sequences in batches of 2 make 1 batch")
    assert not (tmp_path / "few").exists()


def test_nproc_rank_killed_ends_the_run_in_one_line(toy_folder: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL of rank 1 (nothing it can catch): the launcher stops rank 0 and says so in one line, no output."""
    toy, corpus = toy_folder
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lowbit.cli.main", "--quiet",
         *quantize_args(toy, corpus, out, "--recipe", "gptq-w4g128", "--nproc", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        victim = next((pid for pid in _children(launcher.pid) if "RANK=1" in _environ(pid)), None)
        time.sleep(0.02)
    assert victim is not None, "rank 1 never started"
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL, stderr
    assert stderr.strip().splitlines() == ["lowbit: error: rank 1 of 2: ended by SIGKILL; no output was written"]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
