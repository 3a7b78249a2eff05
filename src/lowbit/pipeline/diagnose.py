"""Outlier diagnosis: how unevenly each Linear's input channels are scaled, on real calibration text.

The same block loop as quantization, with observers only: nothing is changed, and every block passes its full-
precision outputs on. For each Linear input x [tokens, in] it keeps the per-channel absmax (SmoothQuant's
statistic) and reports:
  * the largest and the median channel absmax, and their ratio: how far one channel stretches a per-tensor grid;
  * ``median_int8_levels`` = 127 * median / max: how many of a symmetric per-tensor INT8 grid's 127 positive levels
    a typical channel can reach (the survey's "only ~5 distinct values out of 256");
  * how many channels ever exceed LLM.int8()'s threshold, i.e. would take its float path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from lowbit.models.arch import block_linears
from lowbit.pipeline.capture import capture_block_calls
from lowbit.pipeline.loop import InMemoryStore, LazyStore, check_calibration
from lowbit.pipeline.memory import release_freed_memory
from lowbit.pipeline.observers import AbsMaxObserver
from lowbit.pipeline.taps import BlockData, run_with_taps

TOP_CHANNELS = 5


@dataclass
class InputOutliers:
    name: str  # full path of the first Linear reading this input
    in_features: int
    max_abs: float
    median_channel_absmax: float
    ratio: float  # max_abs / median_channel_absmax
    median_int8_levels: float
    channels_over_threshold: int
    top_channels: list[int]
    shared_with: list[str] = field(default_factory=list)  # other Linears of the block reading the same input

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_input(name: str, absmax: torch.Tensor, threshold: float) -> InputOutliers:
    """Statistics of one Linear input from its per-channel absmax [in]."""
    absmax = absmax.float().cpu()
    top = float(absmax.max())
    median = float(absmax.median())
    return InputOutliers(
        name=name,
        in_features=absmax.numel(),
        max_abs=top,
        median_channel_absmax=median,
        ratio=top / median if median > 0 else float("inf"),
        median_int8_levels=127.0 * median / top if top > 0 else 0.0,
        channels_over_threshold=int((absmax > threshold).sum()),
        top_channels=torch.topk(absmax, min(TOP_CHANNELS, absmax.numel())).indices.tolist(),
    )


@torch.no_grad()
def diagnose_outliers(
    store: InMemoryStore | LazyStore,
    ids: torch.Tensor,
    *,
    threshold: float = 6.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[list[InputOutliers], dict[str, torch.Tensor]]:
    """Statistics of every distinct Linear input over calibration ids [N, L] (Linears reading the same tensor, such
    as q/k/v, share one row); also returns each input's per-channel absmax [in] by row name, for plots."""
    ids = check_calibration(ids)
    store.prepare(device)
    results: list[InputOutliers] = []
    absmax: dict[str, torch.Tensor] = {}
    try:
        calls = capture_block_calls(store.model, store.blocks, ids, batch_size, device)
        store.captured()
        hidden = calls.hidden
        for i in range(len(store.blocks)):
            prefix = f"{store.arch.blocks}.{i}"
            block = store.load(i, device)
            observers = {path: AbsMaxObserver() for path in block_linears(block)}
            hidden = run_with_taps(block, BlockData(hidden, calls.calls[i]), {p: [o] for p, o in observers.items()})
            block_results: list[InputOutliers] = []
            for path, observer in observers.items():
                assert observer.absmax is not None
                channels = observer.absmax.cpu()
                same = next((r for r in block_results if torch.equal(absmax[r.name], channels)), None)
                if same is not None:  # q/k/v or gate/up: one input, one row
                    same.shared_with.append(path.rsplit(".", 1)[-1])
                    continue
                absmax[f"{prefix}.{path}"] = channels
                block_results.append(summarize_input(f"{prefix}.{path}", channels, threshold))
            results.extend(block_results)
            calls.calls[i] = []
            store.finish(i, block)
            release_freed_memory()
    finally:
        store.close()
    return results, absmax
