"""What a quantization run reports: per Linear and per block, the method, relative output error and time."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table


@dataclass
class LinearRecord:
    name: str
    method: str
    rel_error: float  # ||y_q - y_fp|| / ||y_fp|| on the calibration inputs this Linear really saw
    seconds: float
    note: str = ""


@dataclass
class FoldRecord:
    """One SmoothQuant/AWQ scale fold (``prev`` -> ``linears``), kept only when proven to leave the block's float32
    output unchanged; otherwise ``reason`` says why it was refused (its Linears were quantized unsmoothed)."""

    method: str  # "smoothquant" or "awq"
    prev: str
    linears: list[str]
    applied: bool
    change: float  # relative change of the block's float32 output the fold made (NaN: not tried)
    reason: str = ""


@dataclass
class BlockRecord:
    index: int
    seconds: float
    rel_error: float  # the whole block's output error
    linears: list[LinearRecord] = field(default_factory=list)
    memory_bytes: int = 0  # GPU peak during the block on CUDA; process RSS after it on CPU
    folds: list[FoldRecord] = field(default_factory=list)
    # seconds per phase, in order: load, transform or reference pass, statistics passes, compress, final pass,
    # write (pipeline/block.py times the middle ones, the block loop load and write)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class QuantizeReport:
    recipe: dict[str, Any]
    calibration: dict[str, Any]
    blocks: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    # the process's peak resident bytes at the end of each phase (before blocks, capture, blocks, head inputs,
    # outside blocks: the tensors outside the blocks written): the phase in which it last rose set the peak
    peak_rss: dict[str, int] = field(default_factory=dict)
    outside_seconds: dict[str, float] = field(default_factory=dict)  # capture, head inputs: outside the blocks

    def add_outside_phase(self, phase: str, seconds: float) -> None:
        """A phase of the run before (or after) the block loop, e.g. a budget's plan; 0 seconds: it did not run."""
        if seconds:
            self.outside_seconds[phase] = seconds
            self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizeReport:
        blocks = [
            BlockRecord(**{**b, "linears": [LinearRecord(**r) for r in b.get("linears", [])],
                           "folds": [FoldRecord(**f) for f in b.get("folds", [])]})
            for b in data.get("blocks", [])
        ]
        return cls(data["recipe"], data["calibration"], blocks, data.get("seconds", 0.0), data.get("peak_rss", {}),
                   data.get("outside_seconds", {}))

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase: capturing block 0's inputs, then each block phase summed over blocks (in the order
        they first appear), then the head's inputs."""
        totals: dict[str, float] = {k: v for k, v in self.outside_seconds.items() if k == "capture"}
        for b in self.blocks:
            for phase, seconds in b.phases.items():
                totals[phase] = totals.get(phase, 0.0) + seconds
        totals.update({k: v for k, v in self.outside_seconds.items() if k != "capture"})
        return totals

    def mean_linear_error(self) -> float:
        """Mean relative error over Linears; NaN when the run was not measured (a data-free recipe, no data)."""
        errors = [r.rel_error for b in self.blocks for r in b.linears]
        return sum(errors) / len(errors) if errors else 0.0

    @property
    def measured(self) -> bool:
        return self.calibration.get("n_sequences", 0) > 0

    def refused_folds(self) -> list[str]:
        """One line per refused scale group (method, prev op): in how many blocks, and the first block's reason."""
        refused: dict[tuple[str, str], list[tuple[int, FoldRecord]]] = {}
        for b in self.blocks:
            for f in b.folds:
                if not f.applied:
                    refused.setdefault((f.method, f.prev), []).append((b.index, f))
        return [
            f"{method} did not fold {prev} -> {', '.join(cases[0][1].linears)} in {len(cases)} of {len(self.blocks)} "
            f"blocks (first: block {cases[0][0]}, {cases[0][1].reason}); those Linears were quantized unsmoothed"
            for (method, prev), cases in refused.items()
        ]


def block_row(record: BlockRecord) -> str:
    """One log line per finished block, so a long run shows whether it is healthy."""
    if math.isnan(record.rel_error):
        return f"block {record.index}: compressed without data in {record.seconds:.1f}s"
    worst = max(record.linears, key=lambda r: r.rel_error, default=None)
    tail = f", worst {worst.name.rsplit('.', 2)[-2]}.{worst.name.rsplit('.', 1)[-1]} {worst.rel_error:.4f}" if worst else ""
    refused = sum(not f.applied for f in record.folds)
    tail += f", {refused} of {len(record.folds)} folds refused" if refused else ""
    return (
        f"block {record.index}: output error {record.rel_error:.4f} in {record.seconds:.1f}s, "
        f"memory {record.memory_bytes / 2**20:,.0f} MiB{tail}"
    )


def layer_table(report: QuantizeReport, per_linear: bool = True) -> Table:
    """Rows per Linear (layer, method, relative output error, time, note) and a bold row per block."""
    table = Table(title=f"per-layer report: {report.recipe.get('name', '')}")
    columns = (("layer", "left"), ("method", "left"), ("rel. error", "right"), ("time s", "right"), ("memory", "right"), ("note", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for b in report.blocks:
        for r in b.linears if per_linear else []:
            table.add_row(r.name, r.method, _error(r.rel_error), f"{r.seconds:.2f}", "", r.note)
        worst = max((r.rel_error for r in b.linears), default=0.0)
        table.add_row(
            f"block {b.index} output", "", _error(b.rel_error), f"{b.seconds:.1f}", f"{b.memory_bytes / 2**20:,.0f} MiB",
            f"worst Linear {_error(worst)}", style="bold",
        )
    return table


def _error(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"
