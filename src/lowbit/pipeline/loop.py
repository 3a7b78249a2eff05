"""The one block loop every algorithm runs in.

capture block-0 inputs once -> for each block: materialise it, transform, compress, measure (its quantized
outputs feed the next block), hand it to the caller (write it out and free it, or keep it) -> report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.calibration import check_ids_fit_model
from lowbit.distributed.ranks import SINGLE, Ranks
from lowbit.errors import LowbitError
from lowbit.models.arch import arch_for, check_blocks, get_submodule
from lowbit.models.experts import all_tokens_to_all_experts, unfuse_experts
from lowbit.models.lazy import LazyModel, conv1d_to_linear
from lowbit.pipeline.block import compress_without_data, process_block
from lowbit.pipeline.capture import capture_block_calls
from lowbit.pipeline.context import BlockContext, check_ignore_leaves_work, check_plan, select_targets
from lowbit.pipeline.memory import (
    block_memory_bytes, long_lived_objects_frozen, release_freed_memory, reset_peak_memory,
)
from lowbit.pipeline.pass_cache import budget_from_env
from lowbit.pipeline.peak_rss import high_water_bytes, peak_during
from lowbit.pipeline.report import BlockRecord, QuantizeReport, block_row
from lowbit.pipeline.taps import BlockData
from lowbit.recipe import Recipe

log = logging.getLogger(__name__)
T = TypeVar("T")

# sequences whose full-precision block outputs are kept to measure block and Linear errors: 8 x seq_len tokens
# estimate a relative error well, and each measured batch costs a full-precision block pass and a reference matmul
# per Linear, a third of GPTQ's time per block when every batch was measured
ERROR_SEQUENCES = 8


def move_outside_blocks(model: nn.Module, blocks_path: str, device: torch.device | str) -> None:
    """Move every materialised tensor that is not inside a decoder block, keeping tied parameters tied."""
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for param in module.parameters(recurse=False):
            if param.device.type != "meta":
                param.data = param.data.to(device)
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                module._buffers[key] = buf.to(device)


class InMemoryStore:
    """Blocks of a model that is already in memory: moved to the work device one at a time, kept afterwards."""

    def __init__(self, model: nn.Module, outside: Callable[[nn.Module], None] | None = None) -> None:
        self.model = model
        self.outside = outside  # applied once, before block 0's inputs are captured (a rotation of the embedding)
        self.model_type: str = model.config.model_type
        unfuse_experts(model)  # 3-D expert tensors become per-expert Linears, as in LazyModel
        self.arch = arch_for(self.model_type, model)
        if self.arch.conv1d:
            conv1d_to_linear(model)
        self.blocks: nn.ModuleList = get_submodule(model, self.arch.blocks, self.model_type)  # type: ignore[assignment]
        check_blocks(self.arch, self.blocks, self.model_type)
        self.home = next(model.parameters()).device

    def prepare(self, device: torch.device | str) -> None:
        if self.outside is not None:
            self.outside(self.model)
            self.outside = None
        move_outside_blocks(self.model, self.arch.blocks, device)

    def captured(self) -> None:
        pass

    def load(self, index: int, device: torch.device | str) -> nn.Module:
        return self.blocks[index].to(device)

    def finish(self, index: int, block: nn.Module) -> None:
        block.to(self.home)

    def close(self) -> None:
        move_outside_blocks(self.model, self.arch.blocks, self.home)


class LazyStore:
    """Blocks read from disk when their turn comes; each finished block goes to ``on_block_done`` and is freed."""

    def __init__(
        self, lazy: LazyModel, on_block_done: Callable[[str, nn.Module], None],
        outside: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.lazy = lazy
        self.outside = outside  # applied to the modules outside the blocks each time they are read
        self.model, self.model_type, self.arch, self.blocks = lazy.model, lazy.model_type, lazy.arch, lazy.blocks
        self.on_block_done = on_block_done

    def prepare(self, device: torch.device | str) -> None:
        self.lazy.materialize_outside_blocks(device)
        if self.outside is not None:
            self.outside(self.model)
        move_outside_blocks(self.model, self.arch.blocks, device)

    def captured(self) -> None:
        """Embeddings are only needed to capture block 0's inputs (they are copied to the output from disk): the
        weights outside the blocks go back to meta. Computed buffers (rotary tables) stay: they are not in the
        checkpoint, so a later ``prepare`` (for the head's inputs) could not bring them back."""
        for module in self.model.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = nn.Parameter(param.data.to("meta"), requires_grad=False)
            for key, buf in module._buffers.items():
                if buf is not None and key not in module._non_persistent_buffers_set:
                    module._buffers[key] = buf.to("meta")

    def load(self, index: int, device: torch.device | str) -> nn.Module:
        prefix = f"{self.arch.blocks}.{index}"
        self.lazy.materialize(prefix, device)
        return self.blocks[index]

    def finish(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.arch.blocks}.{index}"
        self.on_block_done(prefix, block)
        self.lazy.release(prefix)

    def close(self) -> None:
        pass


def check_calibration(ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Token ids [N, L] the model can embed (the Python API gets the CLI's checks here)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise LowbitError("calibration must be a LongTensor of token ids shaped [n_sequences, seq_len]")
    check_ids_fit_model(ids, config)
    return ids.long()


def check_ranks_agree(
    ranks: Ranks, store: InMemoryStore | LazyStore, recipe: Recipe, ids: torch.Tensor | None, batch_size: int,
    seed: int,
) -> None:
    """Before any work on several ranks: every rank was given the same recipe, calibration, batching and model
    (config and tensor layout here; each block's weights when it is loaded), and every rank has a batch to run."""
    if not ranks.distributed:
        return
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in store.model.state_dict().items()]
    ranks.check_same("inputs", {
        "recipe": recipe.to_dict(), "calibration ids": ids if ids is not None else "none",
        "batch size": batch_size, "seed": seed, "model config": store.model.config.to_dict(), "model layout": layout,
    })
    n_batches = 0 if ids is None else math.ceil(ids.shape[0] / batch_size)
    if ids is not None and n_batches < ranks.size:
        raise LowbitError(
            f"{ids.shape[0]} calibration sequences in batches of {batch_size} make {n_batches} batch(es) for "
            f"{ranks.size} ranks: every rank needs at least one; use fewer ranks, a smaller --batch-size or more "
            "--nsamples"
        )


def weights_fingerprint(block: nn.Module) -> torch.Tensor:
    """[n_tensors] float64 sums of a block's floating tensors (accumulated in float64 without a widened copy): equal
    on ranks that read the same weights; compared before the block is calibrated, so a rank given another
    checkpoint is refused rather than averaged in."""
    sums = [t.sum(dtype=torch.float64).cpu() for t in block.state_dict().values() if t.is_floating_point()]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def run_blocks(
    store: InMemoryStore | LazyStore,
    recipe: Recipe,
    ids: torch.Tensor | None,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    seed: int = 0,
    saved: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
    after_blocks: Callable[[list[torch.Tensor]], None] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[QuantizeReport, dict[str, torch.Tensor]]:
    """Quantize every block of ``store`` with ``recipe`` on calibration ``ids`` [N, L].

    ``ids`` may be None for a data-free recipe (RTN, magnitude pruning, LLM.int8(), dynamic activations): each block
    is then compressed without a forward pass, and the report has no errors (NaN). Returns the report and the
    transform artifact (SmoothQuant/AWQ scales and clips, by tensor name); ``saved`` is an earlier run's artifact
    to re-apply instead of searching. With several ``ranks`` every rank calls this with the same arguments: each
    runs its share of the calibration batches, the statistics are reduced over ranks and the per-Linear work is
    divided, so every rank ends with the same compressed blocks (docs/distributed.md). ``after_blocks`` gets the
    last block's outputs (one tensor per local calibration batch) with the model's other modules in place.
    ``compute_dtype`` (None, or torch.bfloat16): the precision of the calibration forwards (pipeline/compute.py).
    """
    check_ignore_leaves_work(store.blocks, store.arch.blocks, recipe.ignore)
    check_plan(store.blocks, store.arch.blocks, recipe)
    if ids is None and recipe.needs_calibration:
        raise LowbitError(f"recipe {recipe.name!r} needs calibration data: pass token ids [n_sequences, seq_len]")
    ids = None if ids is None else check_calibration(ids, store.model.config)
    check_ranks_agree(ranks, store, recipe, ids, batch_size, seed)
    if ranks.distributed and recipe.needs().float_targets:
        raise LowbitError(f"recipe {recipe.name!r} tunes each block by gradient descent (AutoRound), which runs on one "
                          "process: each rank's steps would differ; quantize without --nproc")
    budget_from_env()  # a malformed LOWBIT_PASS_CACHE_MIB ends the run here, before any work
    start = time.perf_counter()
    shape = {"n_sequences": 0, "seq_len": 0} if ids is None else {"n_sequences": ids.shape[0], "seq_len": ids.shape[1]}
    settings = {**shape, "batch_size": batch_size, "seed": seed}
    if compute_dtype is not None:
        settings["compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    report = QuantizeReport(recipe.to_dict(), settings)
    report.peak_rss["before blocks"] = high_water_bytes()  # imports, the model's skeleton, the calibration ids
    artifact: dict[str, torch.Tensor] = {}
    with long_lived_objects_frozen():
        _run(store, recipe, ids, report, artifact, batch_size, device, seed, saved, progress, ranks, after_blocks,
             compute_dtype)
    report.seconds = time.perf_counter() - start
    return report, artifact


def walk_blocks(
    store: InMemoryStore | LazyStore,
    ids: torch.Tensor | None,
    visit: Callable[[int, str, nn.Module, BlockData | None], T],
    *,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    desc: str,
    ranks: Ranks = SINGLE,
    after_blocks: Callable[[list[torch.Tensor]], None] | None = None,
    compute_dtype: torch.dtype | None = None,
    peaks: dict[str, int] | None = None,
    seconds: dict[str, float] | None = None,
) -> Iterator[tuple[int, T, int, dict[str, float]]]:
    """The one block loop, shared by quantization and inspection: capture what every block is called with (unless
    ``ids`` is None: a data-free pass), then per block: materialise it, ``visit(index, prefix, block, data)`` (which
    leaves the block's outputs in ``data.hidden`` for the next block), hand it back to the store (written out and
    freed, or kept), free what it held. Yields (index, what visit returned, the block's peak memory in bytes,
    seconds spent loading and writing it); the store is closed however the loop ends. On several ``ranks`` each captures and runs its own batches.
    ``compute_dtype`` (e.g. bfloat16): what the calibration passes compute in (pipeline/compute.py). ``peaks`` gets
    the peak resident memory at the end of each phase: capturing the inputs, the blocks, the head's inputs;
    ``seconds`` the time of the phases outside the blocks (capture, head inputs)."""
    peaks = {} if peaks is None else peaks
    seconds = {} if seconds is None else seconds
    calls = None
    index = tokens = None
    try:
        if ids is not None:
            store.prepare(device)
            n_batches = math.ceil(ids.shape[0] / batch_size)
            index = ranks.batches(n_batches)
            tokens = [ids[b * batch_size : (b + 1) * batch_size].numel() for b in range(n_batches)]
            mark = time.perf_counter()
            with peak_during(peaks, "capture"):
                calls = capture_block_calls(store.model, store.blocks, ids, batch_size, device, index)
                store.captured()
            seconds["capture"] = time.perf_counter() - mark
        for i in tqdm(range(len(store.blocks)), desc=desc, unit="block", disable=not progress):
            mark = time.perf_counter()
            block = store.load(i, device)
            io = {"load": time.perf_counter() - mark}
            if ranks.distributed:
                ranks.check_same("model weights", {f"{store.arch.blocks}.{i}": weights_fingerprint(block)})
            data = None if calls is None else BlockData(
                calls.hidden, calls.calls[i], index, tokens, ranks, compute_dtype, calls.float_hidden
            )
            reset_peak_memory(device)
            with peak_during(peaks, "blocks"):
                result = visit(i, f"{store.arch.blocks}.{i}", block, data)
            if calls is not None:
                calls.calls[i] = []  # this block's masks and rotary tables are no longer needed
            mark = time.perf_counter()
            store.finish(i, block)
            release_freed_memory()
            io["write"] = time.perf_counter() - mark
            yield i, result, block_memory_bytes(device), io
        if after_blocks is not None and calls is not None:
            mark = time.perf_counter()
            with peak_during(peaks, "head inputs"):
                store.prepare(device)  # the modules after the blocks (a lazy model released them after the capture)
                after_blocks(calls.hidden)
                store.captured()
            seconds["head inputs"] = time.perf_counter() - mark
    finally:
        store.close()


def _run(
    store: InMemoryStore | LazyStore,
    recipe: Recipe,
    ids: torch.Tensor | None,
    report: QuantizeReport,
    artifact: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device | str,
    seed: int,
    saved: dict[str, torch.Tensor] | None,
    progress: bool,
    ranks: Ranks,
    after_blocks: Callable[[list[torch.Tensor]], None] | None,
    compute_dtype: torch.dtype | None,
) -> None:
    """Quantization's visit of each block: transform, compress, measure (or compress only, data-free)."""
    n_gqa = query_heads_per_kv_head(store.model.config)

    def quantize_block(i: int, prefix: str, block: nn.Module, data: BlockData | None) -> BlockRecord:
        ctx = BlockContext(
            prefix=prefix,
            block=block,
            data=data,
            arch=store.arch,
            model_type=store.model_type,
            targets=select_targets(block, prefix, recipe.ignore),
            artifact=artifact,
            seed=seed + i,
            error_batches=math.ceil(ERROR_SEQUENCES / batch_size),
            ranks=ranks,
            layer=i,
            n_layers=len(store.blocks),
            n_gqa=n_gqa,
            plan=recipe.plan,
        )
        if data is None:
            return compress_without_data(ctx, recipe, i)
        with all_tokens_to_all_experts(block):  # every expert calibrated on every token (models/experts.py)
            record = process_block(ctx, recipe, batch_size, saved, i)
        record.folds = ctx.folds
        return record

    blocks = walk_blocks(store, ids, quantize_block, batch_size=batch_size, device=device, progress=progress,
                         desc="quantizing blocks", ranks=ranks, after_blocks=after_blocks, compute_dtype=compute_dtype,
                         peaks=report.peak_rss, seconds=report.outside_seconds)
    try:
        for _, record, memory, io in blocks:
            record.memory_bytes = memory
            record.phases = {"load": io["load"], **record.phases, "write": io["write"]}
            report.blocks.append(record)
            log.info(block_row(record))
    finally:
        blocks.close()  # the store is closed now, not when the generator is collected
    for line in report.refused_folds():  # once per scale group, not once per block
        log.warning(line)


def query_heads_per_kv_head(config: Any) -> int:
    """llama.cpp's n_gqa: attention heads per key/value head (1 for multi-head attention or a config without heads)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads else 1
