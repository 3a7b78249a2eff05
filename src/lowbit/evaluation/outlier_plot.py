"""The outlier diagnosis as a picture: how stretched each kind of Linear input is across depth, and the channel
profile of the most stretched one."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from lowbit.pipeline.diagnose import InputOutliers


def plot_outliers(results: list[InputOutliers], absmax: dict[str, torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    # one line per Linear kind (q_proj, down_proj, ...): ratio max/median channel absmax against block index
    by_kind: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        block, kind = _block_and_kind(r.name)
        by_kind[kind].append((block, r.ratio))
    fig, (depth, profile) = plt.subplots(1, 2, figsize=(13, 5))
    for kind, points in sorted(by_kind.items()):
        blocks, ratios = zip(*sorted(points))
        depth.plot(blocks, ratios, marker=".", label=kind)
    depth.set_yscale("log")
    depth.set_xlabel("block")
    depth.set_ylabel("max channel absmax / median channel absmax")
    depth.set_title("input outliers across depth (per Linear input)")
    depth.grid(True, which="both", alpha=0.3)
    depth.legend(fontsize=7)

    worst = max(results, key=lambda r: r.ratio)
    channels = absmax[worst.name].float()
    profile.plot(channels.numpy(), linewidth=0.7)
    profile.set_yscale("log")
    profile.set_xlabel("input channel")
    profile.set_ylabel("max |x| over calibration tokens")
    profile.set_title(f"{worst.name} input: ratio {worst.ratio:,.0f}, top channels {worst.top_channels[:3]}", fontsize=9)
    profile.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block_and_kind(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    parts = name.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return int(parts[index]), ".".join(parts[index + 1 :])
