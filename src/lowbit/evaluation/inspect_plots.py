"""The inspection as pictures: the classic per-channel outlier profile, a layer x channel heatmap, and the share of
values each grid rounds to zero, per layer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from lowbit.evaluation.inspect_summary import layer_kind
from lowbit.evaluation.plotting import pyplot, save_figure
from lowbit.pipeline.inspect import Inspection

CHANNELS_PNG = "channels.png"
HEATMAP_PNG = "heatmap.png"
ZERO_SHARE_PNG = "zero_share.png"



def _worst_kind(inspection: Inspection) -> str:
    return layer_kind(max(inspection.inputs, key=lambda r: r.ratio).name)


def _kind_absmax(inspection: Inspection, kind: str) -> torch.Tensor:
    """[blocks, in] per-channel absmax of one Linear-input kind across depth."""
    return torch.stack([inspection.input_absmax[r.name] for r in inspection.inputs if layer_kind(r.name) == kind])


def _panels(inspection: Inspection) -> tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]]:
    """(label, absmax [blocks, channels]) of the residual stream and of the most stretched Linear-input kind."""
    kind = _worst_kind(inspection)
    return ("residual stream", inspection.residual_absmax), (f"{kind} input", _kind_absmax(inspection, kind))


def _sampled_blocks(n: int) -> list[int]:
    return sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})


def plot_channels(inspection: Inspection, title: str, path: Path) -> None:
    """Per-channel max |x| of the residual stream and of the most stretched Linear-input kind, at five depths."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, (label, absmax) in zip(axes, _panels(inspection)):
        for b in _sampled_blocks(absmax.shape[0]):
            ax.plot(absmax[b].float().numpy(), linewidth=0.7, label=f"block {b}")
        ax.set_yscale("log")
        ax.set_xlabel("channel")
        ax.set_ylabel("max |x| over calibration tokens")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, title)


def plot_heatmap(inspection: Inspection, title: str, path: Path) -> None:
    """log10 per-channel max |x|, block x channel: outlier channels show as bright vertical stripes."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(14, 8))
    for ax, (label, absmax) in zip(axes, _panels(inspection)):
        image = ax.imshow(absmax.float().clamp(min=1e-6).log10().numpy(), aspect="auto", interpolation="nearest", cmap="magma")
        ax.set_xlabel("channel")
        ax.set_ylabel("block")
        ax.set_title(label)
        fig.colorbar(image, ax=ax, label="log10 max |x|")
    save_figure(fig, path, title)


def plot_zero_share(inspection: Inspection, title: str, path: Path) -> None:
    """Share of values rounded to zero per block: activations (mean over the block's Linear inputs) per-tensor,
    per-token and smoothed; weights (mean over the block's Linears) per-tensor, per-channel and per-group."""
    plt = pyplot()
    acts: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    weights: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in inspection.inputs:
        for bits, schemes in r.activations.items():
            for scheme, usage in schemes.items():
                acts[f"{bits.upper()} {scheme.replace('_', '-')}"][r.block].append(usage.zero_share)
        for grids in r.weights.values():
            for bits, by_grid in grids.items():
                for grid, usage in by_grid.items():
                    weights[f"{bits.upper()} {grid.replace('_', '-')}"][r.block].append(usage.zero_share)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, (label, series) in zip(axes, (("activations", acts), ("weights", weights))):
        for name, per_block in series.items():
            blocks = sorted(per_block)
            ax.plot(blocks, [100 * sum(per_block[b]) / len(per_block[b]) for b in blocks], marker=".",
                    linestyle="-" if name.startswith("INT8") else "--", label=name)
        ax.set_xlabel("block")
        ax.set_ylabel("% of non-zero values rounded to zero")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, title)


def write_plots(inspection: Inspection, title: str, folder: Path) -> list[Path]:
    paths = [folder / CHANNELS_PNG, folder / HEATMAP_PNG, folder / ZERO_SHARE_PNG]
    for plot, path in zip((plot_channels, plot_heatmap, plot_zero_share), paths):
        plot(inspection, title, path)
    return paths
