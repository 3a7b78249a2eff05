"""matplotlib for files only: the one place that picks the backend and writes and closes a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.io.atomic import write_atomic


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, never a window), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str | None = None) -> None:
    """Lay out, write as PNG and free ``fig``; ``title`` goes above all its panels."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)
