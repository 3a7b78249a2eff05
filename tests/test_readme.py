"""The README's Python example runs as written, on a tiny model in place of ``path/to/model``."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from toy import save_toy

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    folder = save_toy("llama", tmp_path / "toy")
    code = python_example()
    assert '"path/to/model"' in code
    monkeypatch.chdir(tmp_path)  # its outputs go to out/ under the current folder
    namespace: dict = {}
    exec(compile(code.replace('"path/to/model"', repr(str(folder))), str(README), "exec"), namespace)
    assert "mean Linear error" in capsys.readouterr().out
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(namespace["restored"](ids).logits, namespace["model"](ids).logits)
    assert (tmp_path / "model-gptq-ct" / "config.json").exists()
