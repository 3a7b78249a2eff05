"""`inspect`: the activation-outlier diagnosis, on the same block loop and calibration data as quantization.

Observers only: nothing in the model changes and every block passes its full-precision outputs on. For each
distinct Linear input x [tokens, in] (q/k/v, which read one tensor, make one row) and for each block's residual
stream input it records per-channel absmax and mean |x|, the outlier channels (by an absolute threshold, LLM.int8()'s
6.0, and by a ratio to the median channel), how often those channels are outliers token by token, kurtosis, and how
much of an INT8 / INT4 grid the values really use per-tensor, per-token and after SmoothQuant smoothing. For each
Linear it adds the weights' grid usage per-tensor / per-channel / g128 and the AWQ salient-column experiment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit.models.arch import block_linears
from lowbit.numerics.grid_usage import (
    GridUsage,
    activation_usage,
    float_activation_usage,
    float_weight_usage,
    weight_usage,
)
from lowbit.numerics.salient import kept_column_errors
from lowbit.numerics.scales import smoothquant_scales
from lowbit.models.experts import all_tokens_to_all_experts
from lowbit.pipeline.context import shared_inputs
from lowbit.pipeline.loop import InMemoryStore, LazyStore, check_calibration, walk_blocks
from lowbit.pipeline.observers import AbsMaxObserver, MeanAbsObserver, MomentsObserver, TokenSampleObserver
from lowbit.pipeline.taps import BlockData, run_with_taps
from lowbit.methods.base import WeightQuant


@dataclass(frozen=True)
class InspectSettings:
    threshold: float = 6.0  # |x| above which a channel is an outlier (LLM.int8()'s default)
    ratio: float = 20.0  # channel absmax / median channel absmax above which a channel is an outlier
    sample_tokens: int = 512  # tokens kept per input for the grid-usage and salient measurements
    smooth_alpha: float = 0.5  # SmoothQuant's migration strength for the "after smoothing" column
    salient_share: float = 0.01  # AWQ's 1% of columns
    salient_bits: int = 3  # AWQ Table 1 measures at INT3 g128, where the effect is large
    group_size: int = 128


@dataclass
class ChannelStats:
    """Statistics of one activation tensor (a Linear input or a residual stream)."""

    name: str
    block: int
    in_features: int
    max_abs: float
    median_channel_absmax: float
    ratio: float  # max_abs / median_channel_absmax
    kurtosis: float
    outliers_by_threshold: list[int]
    outliers_by_ratio: list[int]
    token_share: dict[int, float]  # outlier channel -> share of sampled tokens in which it is an outlier
    activations: dict[str, dict[str, GridUsage]] = field(default_factory=dict)  # "int8"/"float" -> scheme -> usage
    shared_with: list[str] = field(default_factory=list)  # other Linears of the block reading the same input
    weights: dict[str, dict[str, dict[str, GridUsage]]] = field(default_factory=dict)  # linear -> "int4"/"float" -> grid
    salient: dict[str, dict[str, float]] = field(default_factory=dict)  # linear -> kept_column_errors

    @property
    def outlier_channels(self) -> list[int]:
        return sorted(set(self.outliers_by_threshold) | set(self.outliers_by_ratio))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inspection:
    settings: InspectSettings
    calibration: dict[str, Any]
    inputs: list[ChannelStats]
    residual: list[ChannelStats]
    input_absmax: dict[str, torch.Tensor]  # input name -> per-channel absmax [in], for plots
    input_mean_abs: dict[str, torch.Tensor]  # input name -> per-channel mean |x| [in]
    residual_absmax: torch.Tensor  # [blocks, hidden]

    def channel_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-channel statistic by name: '<input>.absmax', '<input>.mean_abs', 'residual.absmax' [blocks, hidden]."""
        tensors = {f"{name}.absmax": t.float().contiguous() for name, t in self.input_absmax.items()}
        tensors.update({f"{name}.mean_abs": t.float().contiguous() for name, t in self.input_mean_abs.items()})
        tensors["residual.absmax"] = self.residual_absmax.float().contiguous()
        return tensors


def channel_stats(
    name: str, block: int, absmax: torch.Tensor, sample: torch.Tensor, kurtosis: float, settings: InspectSettings,
    threshold: float | None = None,
) -> ChannelStats:
    """Outlier statistics of one tensor from its per-channel absmax [in] and a token sample [tokens, in].

    ``threshold`` (default: the settings') is the absolute test; the residual stream, whose scale no norm fixes,
    passes infinity and is judged by the ratio test alone."""
    threshold = settings.threshold if threshold is None else threshold
    absmax, sample = absmax.float().cpu(), sample.float().cpu()
    top, median = float(absmax.max()), float(absmax.median())
    by_threshold = torch.nonzero(absmax > threshold).flatten().tolist()
    by_ratio = torch.nonzero(absmax > settings.ratio * median).flatten().tolist() if median > 0 else []
    channels = sorted(set(by_threshold) | set(by_ratio))
    # within each token, the same two tests against that token's own median channel
    token_median = sample.abs().median(dim=1, keepdim=True).values  # [tokens, 1]
    flagged = (sample.abs() > threshold) | (sample.abs() > settings.ratio * token_median)  # [tokens, in]
    share = flagged.float().mean(dim=0)  # [in]
    stats = ChannelStats(
        name=name, block=block, in_features=absmax.numel(), max_abs=top, median_channel_absmax=median,
        ratio=top / median if median > 0 else float("inf"), kurtosis=kurtosis, outliers_by_threshold=by_threshold,
        outliers_by_ratio=by_ratio, token_share={c: float(share[c]) for c in channels},
    )
    stats.activations = {f"int{bits}": activation_usage(sample, bits, absmax.max()) for bits in (8, 4)}
    stats.activations["float"] = float_activation_usage(sample, absmax.max())
    return stats


def add_linear_stats(
    stats: ChannelStats, linears: dict[str, torch.nn.Linear], mean_abs: torch.Tensor, sample: torch.Tensor,
    absmax: torch.Tensor, settings: InspectSettings,
) -> None:
    """Weights' grid usage, the salient-column experiment, and activation usage after SmoothQuant smoothing for
    the Linears reading this input (their weights' column absmax enter the smoothing scales together)."""
    spec = WeightQuant(bits=settings.salient_bits, symmetric=False, granularity="group", group_size=settings.group_size)
    for path, linear in linears.items():
        W = linear.weight.detach().float()
        stats.weights[path] = {f"int{bits}": weight_usage(W, bits, settings.group_size) for bits in (8, 4)}
        stats.weights[path]["float"] = float_weight_usage(W)
        stats.salient[path] = kept_column_errors(W, sample, mean_abs, spec, settings.salient_share)
    weight_absmax = torch.stack([m.weight.detach().float().abs().amax(dim=0).cpu() for m in linears.values()]).amax(dim=0)
    s = smoothquant_scales(absmax.float().cpu(), weight_absmax, settings.smooth_alpha)  # [in]
    smoothed = sample.float().cpu() / s
    for bits in (8, 4):
        usage = activation_usage(smoothed, bits, (absmax.float().cpu() / s).max())
        stats.activations[f"int{bits}"]["smoothed_per_tensor"] = usage["per_tensor"]


def residual_stats(block: int, hidden: list[torch.Tensor], settings: InspectSettings) -> tuple[ChannelStats, torch.Tensor]:
    """The residual stream entering a block (hidden [batch, seq, hidden] per calibration batch)."""
    absmax, moments, sample = AbsMaxObserver(), MomentsObserver(), TokenSampleObserver(settings.sample_tokens, seed=block)
    for h in hidden:
        for observer in (absmax, moments, sample):
            observer.add_batch(h)
    assert absmax.absmax is not None and sample.rows is not None
    stats = channel_stats(f"block {block} input", block, absmax.absmax, sample.rows, moments.kurtosis, settings, float("inf"))
    return stats, absmax.absmax.cpu()


@torch.no_grad()
def inspect_model(
    store: InMemoryStore | LazyStore,
    ids: torch.Tensor,
    settings: InspectSettings = InspectSettings(),
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    on_block: Any = None,
    compute_dtype: torch.dtype | None = None,
) -> Inspection:
    """Inspect every block over calibration ids [N, L]; ``on_block(i)`` is called after each block (progress).
    ``compute_dtype``: the precision of the forwards (pipeline/compute.py)."""
    ids = check_calibration(ids, store.model.config)
    inputs: list[ChannelStats] = []
    residual: list[ChannelStats] = []
    input_absmax: dict[str, torch.Tensor] = {}
    input_mean_abs: dict[str, torch.Tensor] = {}
    residual_absmax: list[torch.Tensor] = []

    def observe_block(i: int, prefix: str, block: torch.nn.Module, data: BlockData | None) -> None:
        assert data is not None
        stream, stream_absmax = residual_stats(i, data.hidden, settings)
        residual.append(stream)
        residual_absmax.append(stream_absmax)
        linears = block_linears(block)
        observers = {
            path: (AbsMaxObserver(), MeanAbsObserver(), MomentsObserver(), TokenSampleObserver(settings.sample_tokens, seed=i))
            for path in linears
        }
        # every expert sees every token, as when quantizing (models/experts.py); the block's outputs stay the routed
        # ones and, unquantized, are the next block's inputs
        with all_tokens_to_all_experts(block):
            data.hidden[:] = run_with_taps(block, data, {p: list(o) for p, o in observers.items()})
        for paths in shared_inputs(store.arch, block, list(linears)):  # one row per distinct input
            absmax, mean_abs, moments, sample = observers[paths[0]]
            assert absmax.absmax is not None and sample.rows is not None
            stats = channel_stats(f"{prefix}.{paths[0]}", i, absmax.absmax, sample.rows, moments.kurtosis, settings)
            stats.shared_with = [p.rsplit(".", 1)[-1] for p in paths[1:]]
            add_linear_stats(stats, {p: linears[p] for p in paths}, mean_abs.mean, sample.rows, absmax.absmax, settings)
            inputs.append(stats)
            input_absmax[stats.name] = absmax.absmax.cpu()
            input_mean_abs[stats.name] = mean_abs.mean.cpu()

    blocks = walk_blocks(store, ids, observe_block, batch_size=batch_size, device=device, progress=False,
                         desc="inspecting blocks", compute_dtype=compute_dtype)
    try:
        for i, _, _, _ in blocks:
            if on_block is not None:
                on_block(i)
    finally:
        blocks.close()  # the store is closed now, not when the generator is collected
    calibration = {"n_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    return Inspection(settings, calibration, inputs, residual, input_absmax, input_mean_abs, torch.stack(residual_absmax))
