from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# two threads per process; under pytest-xdist (`make test` runs two workers) the cores are shared among the workers
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))

from toy import save_toy, trained_toy, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    """toy_folder(model_type) -> a saved tiny model with tokenizer, built once per session."""
    cache: dict[str, Path] = {}

    def make(model_type: str = "llama") -> Path:
        if model_type not in cache:
            cache[model_type] = save_toy(model_type, tmp_path_factory.mktemp(f"toy-{model_type}"))
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory):
    """A saved tiny Llama trained on the test corpus, with function-preserving outlier channels (toy.trained_toy)."""
    root = tmp_path_factory.mktemp("trained")
    return trained_toy(root / "model", write_corpus(root / "corpus.txt"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep GGUF conversions of test files out of the user's cache (the embedded model's cache is shared)."""
    if "LOWBIT_CACHE" not in os.environ:
        monkeypatch.setenv("LOWBIT_CACHE", str(Path.home() / ".cache" / "lowbit"))
    monkeypatch.delenv("LOWBIT_GGUF_DTYPE", raising=False)  # every test sees the default import dtype
