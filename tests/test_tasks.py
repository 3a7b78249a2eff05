"""Task accuracy through lm-evaluation-harness (`lowbit eval/compare --tasks`), offline: a local multiple-choice
task (tests/data/tasks/capitals.jsonl, 24 questions, the right answer at every position in turn) whose YAML is
written here with the file's absolute path. lm-eval's scores are checked against log-likelihoods computed
directly from the same model; the embedded real model must score far above chance; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lowbit.api import load, quantize_checkpoint
from lowbit.cli.main import main
from lowbit.evaluation.evaluate import evaluate
from lowbit.evaluation.tasks import TaskOptions
from lowbit.models.tokenizer import load_tokenizer
from lowbit.presets import resolve_recipe
from toy import write_corpus

pytest.importorskip("lm_eval")  # the [eval] extra; `make install` has it (pyproject's test extra)

DATA = Path(__file__).parent / "data" / "tasks" / "capitals.jsonl"
# the repository's example task, with its data file's absolute path: the tests may run from any folder
TASK_YAML = (DATA.parent / "capitals.yaml").read_text().replace("tests/data/tasks/capitals.jsonl", "{data}")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "capitals.yaml").write_text(TASK_YAML.format(data=DATA))
    # a task whose data file is missing; one folder for both, so lm-eval indexes its ~15,000 tasks once
    (folder / "gone.yaml").write_text(TASK_YAML.replace("task: capitals", "task: gone").format(data=folder / "no.jsonl"))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module")
def quantized(toy_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "q"
    quantize_checkpoint(toy_folder(), resolve_recipe("w4g128"), None, out, progress=False)
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@torch.no_grad()
def direct_accuracy(model: torch.nn.Module, tokenizer) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them, computed here: for each choice, the summed log-probability of
    " " + choice after the question (the continuation's tokens are those of question + continuation past the
    question's own, no special tokens); acc_norm divides by the choice's length in characters."""
    right = right_norm = 0
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]  # [len - 1, vocab]
            targets = ids[0, len(context):]
            scores.append(logprobs[len(context) - 1:].gather(1, targets[:, None]).sum().item())
        right += max(range(4), key=lambda i: scores[i]) == doc["answer"]
        right_norm += max(range(4), key=lambda i: scores[i] / len(doc["choices"][i])) == doc["answer"]
    return right / len(docs), right_norm / len(docs)


def test_lm_eval_scores_a_lowbit_output_as_its_own_logits_do(quantized, tasks_dir, corpus, capsys):
    code, out, _ = run(capsys, "eval", quantized, "--data", corpus, "--window", "32", "--max-windows", "1",
                       "--tasks", "capitals", "--tasks-dir", tasks_dir, "--json")
    assert code == 0
    summary = json.loads(out)
    scores = summary["tasks"]["capitals"]
    assert summary["task_examples"] == {"capitals": 24} and summary["perplexity"] > 1
    model = load(quantized, backend="dequantized")
    acc, acc_norm = direct_accuracy(model, load_tokenizer(quantized))
    assert scores["acc"] == pytest.approx(acc) and scores["acc_norm"] == pytest.approx(acc_norm)
    assert 0 < scores["acc_stderr"] < 0.2


def test_the_embedded_model_knows_capitals(tasks_dir):
    """Real weights: SmolLM2-135M answers nearly every question (chance is 25%); --limit caps the examples."""
    result = evaluate("smollm2-135m", "wiki", 256, 1, tasks=TaskOptions(("capitals",), tasks_dir, limit=12))
    assert result.tasks.examples == {"capitals": 12}
    assert result.tasks.scores["capitals"]["acc"] >= 0.9


def test_compare_adds_a_column_per_task(toy_folder, tasks_dir, corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, _ = run(capsys, "compare", toy_folder(), "--recipes", "w8", "--out", out, "--calib", corpus,
                     "--data", corpus, "--window", "32", "--max-windows", "1", "--nsamples", "2", "--seq-len", "32",
                     "--no-inspect", "--tasks", "capitals", "--tasks-dir", tasks_dir, "--limit", "8")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [sorted(row["tasks"]) for row in results["rows"]] == [["capitals"], ["capitals"]]
    assert results["settings"]["tasks"]["limit"] == 8
    report = (out / "report.md").read_text()
    assert "| capitals acc_norm |" in report and "lm-evaluation-harness" in report


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "capitals,"], "has an empty task name"),
    (["--limit", "3"], "--limit applies to task accuracy only; add --tasks"),
    (["--tasks", "capitals", "--tasks-dir", "/nonexistent"], "--tasks-dir /nonexistent is not a folder"),
])
def test_bad_task_options_are_one_line(argv, message, quantized, capsys):
    code, _, err = run(capsys, "eval", quantized, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unknown_task_suggests_the_close_one(quantized, tasks_dir, capsys):
    code, _, err = run(capsys, "eval", quantized, "--tasks", "capitalz", "--tasks-dir", tasks_dir)
    assert code == 2 and "lm-eval has no task 'capitalz'" in err and "did you mean capitals?" in err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_task_data_is_refused_before_the_model_loads(quantized, tasks_dir, capsys, monkeypatch):
    monkeypatch.setattr("lowbit.evaluation.evaluate.open_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run(capsys, "eval", quantized, "--tasks", "gone", "--tasks-dir", tasks_dir)
    assert code == 2 and "cannot read the data of task(s) gone" in err and "--tasks-dir" in err
    assert "HF_HUB_OFFLINE=0" not in err  # a missing local file is not the Hub being off


def test_without_lm_eval_the_fix_is_named(quantized, tasks_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = run(capsys, "eval", quantized, "--tasks", "capitals", "--tasks-dir", tasks_dir)
    assert code == 2 and "pip install 'lowbit[eval]'" in err


def test_recommendation_names_the_accuracy_keeper_and_loser():
    from lowbit.evaluation.recommend import task_sentences

    base = {"recipe": "float32", "perplexity": 9.0, "tasks": {"arc": {"acc": 0.5, "acc_norm": 0.6}}}
    a = {"recipe": "a", "perplexity": 10.0, "tasks": {"arc": {"acc": 0.5, "acc_norm": 0.55}}}
    b = {"recipe": "b", "perplexity": 11.0, "tasks": {"arc": {"acc": 0.5, "acc_norm": 0.58}}}
    assert task_sentences(base, [a, b]) == [
        "On arc (acc_norm, float32 60.0): b keeps the most (-2.0 points), a loses the most (-5.0 points); the best by "
        "perplexity, a, is not the best here."]
    assert task_sentences({**base, "tasks": None}, [a, b]) == []


def test_a_stock_task_without_the_hub_says_how_to_allow_it(quantized, tasks_dir, capsys, monkeypatch):
    """lowbit keeps the Hub off (HF_HUB_OFFLINE=1 unless set): a stock task's dataset is then unreachable, and the
    one line says which variable lets lm-eval download it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lowbit.evaluation.evaluate.open_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run(capsys, "eval", quantized, "--tasks", "arc_easy", "--tasks-dir", tasks_dir)
    assert code == 2 and "cannot read the data of task(s) arc_easy" in err and "HF_HUB_OFFLINE=0" in err
    assert len(err.strip().splitlines()) == 1
