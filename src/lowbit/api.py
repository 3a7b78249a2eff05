"""The Python API: quantize a model in memory, save it, load it back; or quantize a checkpoint on disk block by
block without ever holding it whole (what the CLI does)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit.distributed.ranks import SINGLE, Ranks
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory, check_output_dir
from lowbit.io.writer import (
    ARTIFACT_FILE, LOWBIT_CONFIG, ShardWriter, block_shard_name, runtime_module_configs, write_metadata,
)
from lowbit.models.checkpoint import CheckpointReader
from lowbit.models.lazy import LazyModel, output_embedding_key, ties_embeddings
from lowbit.models.source import ModelSource, resolve_model
from lowbit.models.tokenizer import load_tokenizer
from lowbit.pipeline.loop import InMemoryStore, LazyStore, run_blocks
from lowbit.pipeline.head_inputs import head_input_hessian
from lowbit.pipeline.memory import release_freed_memory
from lowbit.pipeline.peak_rss import peak_during
from lowbit.pipeline.outside import (
    OutsidePlan, packed_outside, plan_outside, quantize_outside_in_memory, tie_quantized_head, tied_head_entry,
    tied_head_of,
)
from lowbit.pipeline.report import QuantizeReport
from lowbit.pipeline.rotate import OutsideRotation, check_saved_rotation
from lowbit.pipeline.sensitivity import PLAN_PHASE, needs_plan, plan_budget
from lowbit.recipe import Recipe, Step
from lowbit.runtime.registry import EMBEDDING_CLASSES, build_empty
from lowbit.runtime.backends import BACKENDS
from lowbit.runtime.fast import exact_modules, to_dequantized, to_fast

log = logging.getLogger(__name__)


class TiedHead(TypedDict):
    """lowbit_config.json's ``tied_head``: module paths of a quantized head and the embedding whose table it reads."""

    head: str
    embedding: str


@dataclass
class LowbitInfo:
    """Attached to a quantized model as ``model.lowbit_info``: how it was made."""

    recipe: Recipe
    report: QuantizeReport | None = None
    artifact: dict[str, torch.Tensor] = field(default_factory=dict)


def _as_recipe(recipe: Recipe | Sequence[Step]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe(steps=tuple(recipe))


def saved_artifact(recipe: Recipe) -> dict[str, torch.Tensor] | None:
    """The transform artifact a recipe asks to re-apply (SmoothQuant/AWQ ``artifact=PATH``), if any."""
    step = recipe.transform
    if step is None or getattr(step, "artifact", None) is None:
        return None
    path = Path(step.artifact)
    if path.is_dir():
        path = path / ARTIFACT_FILE
    try:
        saved = load_file(str(path))
    except (OSError, Exception) as exc:  # safetensors raises its own error type for corrupt files
        raise LowbitError(f"cannot read transform artifact {path}: {str(exc)[:160]}") from None
    rotation = next((s for s in recipe.block_transforms if s is not step), None)
    check_saved_rotation(saved, None if rotation is None else getattr(rotation, "seed"))
    return saved


def quantize(
    model: nn.Module,
    recipe: Recipe | Sequence[Step],
    calibration: torch.Tensor | None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    ranks: Ranks | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize a transformers causal LM in place with ``recipe``; ``calibration`` is token ids [N, L], or None
    for a data-free recipe (RTN, magnitude pruning, LLM.int8(), dynamic activations: no forward pass, no errors
    measured).

    Under torchrun, with the default process group initialised (``torch.distributed.init_process_group``), pass
    ``ranks=lowbit.distributed.ranks.current_ranks(device)`` and call this on every rank with the same arguments:
    the calibration is divided among them and every rank returns the same quantized model (docs/distributed.md).
    Without ``ranks`` this process quantizes alone, whatever process group exists. ``compute_dtype=torch.bfloat16``
    runs the calibration forwards in bfloat16 (statistics stay float32; faster where the hardware has bfloat16).

    Returns the same model, its Linears replaced by lowbit runtime modules, with ``model.lowbit_info``.
    """
    recipe = _as_recipe(recipe)
    outside = plan_outside(model, recipe)  # checked before any work
    dtype = next(model.parameters()).dtype
    store = InMemoryStore(model)
    rotation = recipe.outside(model, store.arch, ties_embeddings(model.config))  # checked before any work
    store.outside = rotation.apply_in_memory if rotation is not None else None
    plan_seconds = 0.0
    if needs_plan(recipe):  # a budget: each Linear's grid chosen from the float model's sensitivities first
        mark = time.perf_counter()
        recipe = plan_budget(model, store.arch.blocks, recipe, calibration)
        plan_seconds = time.perf_counter() - mark
    ranks = ranks or SINGLE
    head_hessian: list[torch.Tensor] = []
    report, artifact = run_blocks(
        store, recipe, calibration, batch_size=batch_size, device=device, seed=seed,
        saved=saved_artifact(recipe), progress=progress, ranks=ranks,
        after_blocks=head_inputs(store, outside, ranks, head_hessian), compute_dtype=compute_dtype,
    )
    report.add_outside_phase(PLAN_PHASE, plan_seconds)
    quantize_outside_in_memory(model, outside, dtype, head_hessian[0] if head_hessian else None)
    model.lowbit_info = LowbitInfo(recipe, report, artifact)
    return model


def save(model: nn.Module, folder: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a quantized model (from ``quantize``) as a lowbit checkpoint; atomic: all or nothing."""
    info: LowbitInfo | None = getattr(model, "lowbit_info", None)
    if info is None:
        raise LowbitError("save() takes a model returned by lowbit.quantize() or lowbit.load()")
    folder = Path(folder)
    with exact_modules(model):  # a fast-loaded model saves its stored form, never a kernel's layout
        return _save(model, info, folder, tokenizer, overwrite)


def _save(model: nn.Module, info: LowbitInfo, folder: Path, tokenizer, overwrite: bool) -> Path:  # noqa: ANN001
    store = InMemoryStore(model)
    blocks = store.arch.blocks
    skip = output_embedding_key(model) if ties_embeddings(model.config) else None
    dtype = next(model.parameters()).dtype
    with atomic_directory(folder, overwrite) as tmp:
        writer = ShardWriter(tmp)
        for i, block in enumerate(store.blocks):
            writer.write_module(block_shard_name(f"{blocks}.{i}"), f"{blocks}.{i}", block)
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks + ".") and k != skip}
        writer.write("rest.safetensors", rest)
        writer.finish()
        write_metadata(
            tmp, model.config, runtime_module_configs(model), info.recipe.to_dict(), dtype,
            info.report.to_dict() if info.report else None, info.artifact, tokenizer=tokenizer,
            tied_head=tied_head_of(model),
        )
    return folder


def quantize_checkpoint(
    source: Path,
    recipe: Recipe,
    calibration: torch.Tensor | None,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    ranks: Ranks = SINGLE,
    compute_dtype: torch.dtype | None = None,
) -> QuantizeReport:
    """Quantize the HF checkpoint in ``source`` into ``out`` block by block: each block is read from disk when
    its turn comes, written as soon as it is done, and freed. Peak memory is about one block plus activations.

    On several ``ranks`` (each calling this with the same arguments) rank 0 writes ``out`` and the others write
    nothing; rank 0 renames its output into place only after every rank has finished without error."""
    if ranks.writes:  # the others write nothing (on other machines, OUT's folder may not even exist)
        check_output_dir(out, overwrite, inputs=[source])
    lazy = LazyModel(source, dtype)
    outside = plan_outside(lazy.model, recipe)  # checked before any work
    rotation = recipe.outside(lazy.model, lazy.arch, lazy.tied_embeddings)
    rotate_loaded = rotation.apply_loaded if rotation is not None else None
    saved = saved_artifact(recipe)
    plan_seconds = 0.0
    if needs_plan(recipe):  # a budget: each Linear's grid chosen from the float model's sensitivities first
        mark = time.perf_counter()
        recipe = planned_from_checkpoint(source, recipe, calibration, device)
        plan_seconds = time.perf_counter() - mark
    if not ranks.writes:
        store = LazyStore(lazy, lambda prefix, block: None, rotate_loaded)
        report, _ = run_blocks(store, recipe, calibration, batch_size=batch_size, device=device, seed=seed,
                               saved=saved, progress=False, ranks=ranks,
                               after_blocks=head_inputs(store, outside, ranks, []), compute_dtype=compute_dtype)  # its collectives, too
        report.add_outside_phase(PLAN_PHASE, plan_seconds)
        ranks.barrier()  # this rank is done: rank 0 may commit the output
        return report
    with atomic_directory(out, overwrite, inputs=[source]) as tmp:
        writer = ShardWriter(tmp)
        store = LazyStore(lazy, lambda prefix, block: writer.write_module(block_shard_name(prefix), prefix, block),
                          rotate_loaded)
        head_hessian: list[torch.Tensor] = []
        report, artifact = run_blocks(
            store, recipe, calibration, batch_size=batch_size, device=device, seed=seed, saved=saved,
            progress=progress, ranks=ranks, after_blocks=head_inputs(store, outside, ranks, head_hessian),
            compute_dtype=compute_dtype,
        )
        report.add_outside_phase(PLAN_PHASE, plan_seconds)
        with peak_during(report.peak_rss, "outside blocks"):
            packed = write_outside_blocks(writer, lazy, dtype, outside, head_hessian[0] if head_hessian else None,
                                          rotation)
        writer.finish()
        if rotation is not None:  # the output's head is a tensor of its own (rotated: no longer the embedding)
            lazy.config.tie_word_embeddings = False
        write_metadata(
            tmp, lazy.config, {**runtime_module_configs(lazy.model), **packed}, recipe.to_dict(), dtype,
            report.to_dict(), artifact, tokenizer_source=source, tied_head=tied_head_entry(outside),
        )
        ranks.barrier()  # commit only once every rank has finished: a rank that failed leaves no output
    return report


def planned_from_checkpoint(
    source: Path, recipe: Recipe, calibration: torch.Tensor | None, device: torch.device | str
) -> Recipe:
    """``recipe`` planned to its budget on the whole float32 model read from ``source`` onto ``device`` (freed
    afterwards: the quantization loop then reads its blocks one at a time)."""
    whole = LazyModel(source, torch.float32)
    whole.materialize("", device)
    try:
        return plan_budget(whole.model, whole.arch.blocks, recipe, calibration)
    finally:
        del whole
        release_freed_memory()


LARGE_TENSOR_BYTES = 16 << 20


def head_inputs(
    store: InMemoryStore | LazyStore, outside: OutsidePlan | None, ranks: Ranks, into: list[torch.Tensor]
) -> Callable[[list[torch.Tensor]], None] | None:
    """What collects the Hessian of the head's inputs into ``into`` after the last block, when the plan rounds the
    head from it (GPTQ); None otherwise."""
    if outside is None or not outside.head_needs_hessian:
        return None

    def collect(hidden: list[torch.Tensor]) -> None:
        into.append(head_input_hessian(store.model, store.blocks, hidden, ranks))

    return collect


def write_outside_blocks(
    writer: ShardWriter, lazy: LazyModel, dtype: torch.dtype, outside: OutsidePlan | None = None,
    head_hessian: torch.Tensor | None = None, rotation: OutsideRotation | None = None,
) -> dict[str, dict]:
    """Copy embeddings, final norm and an untied head to the output (packed where ``outside`` quantizes them; their
    module config entries are returned): every large tensor in a shard of its own, written before the next is read,
    the small rest together. Read together, with their memory-mapped pages and safetensors' serialisation copy, a
    1.1B Llama's embedding and untied head (402 MB each) would cost several times one of its blocks (170 MB).
    A ``rotation`` rotates the embedding and the head and folds the final norm into the head (the head of a tied
    checkpoint is written as a tensor of its own)."""
    small: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    head = lazy.model.get_output_embeddings()
    head_has_bias = getattr(head, "bias", None) is not None
    items = lazy.tensors_outside_blocks(dtype)
    if rotation is not None:
        items = rotation.written(items, lambda name: lazy.read([name])[name])
    for i, (name, tensor) in enumerate(items):
        packed = packed_outside(name, tensor, outside, dtype, head_has_bias, head_hessian)
        tensors, entries = packed if packed is not None else ({name: tensor}, {})
        modules.update(entries)
        if sum(t.numel() * t.element_size() for t in tensors.values()) >= LARGE_TENSOR_BYTES:
            writer.write(f"rest-{i:05d}.safetensors", tensors)
        else:
            small.update(tensors)
        del tensor, tensors
    writer.write("rest.safetensors", small)
    return modules


def read_lowbit_config(folder: Path) -> dict:
    """lowbit_config.json of a lowbit output, checked before anything is built from it: written in this lowbit's
    format version, a float dtype, a valid recipe, and every module entry a runtime module this lowbit builds, for a
    module the checkpoint holds tensors for. A hand-edited or foreign file is one line, never a half-built model."""
    from lowbit.io.writer import FORMAT_VERSION
    from lowbit.models.checkpoint import CheckpointReader
    from lowbit.runtime.registry import CONFIG_FIX, check_module_config
    from lowbit.schema import check_record, check_value, read_json

    path = folder / LOWBIT_CONFIG
    if not path.is_file():
        raise LowbitError(f"{folder} is not a lowbit checkpoint (no {LOWBIT_CONFIG}); quantize a model into it first")
    config = read_json(path, "lowbit config", CONFIG_FIX)
    check_value(config, dict, str(path), CONFIG_FIX)
    if config.get("format") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit config (format {config.get('format')!r}); re-run lowbit quantize")
    if "format_version" not in config:
        raise LowbitError(f"{path} has no format_version: it was written by an older lowbit; re-quantize the model")
    check_value(config["format_version"], int, str(path), CONFIG_FIX, "format_version")
    if config["format_version"] != FORMAT_VERSION:
        newer = config["format_version"] > FORMAT_VERSION
        raise LowbitError(
            f"{path} has format_version {config['format_version']}: it was written by "
            f"{'a newer' if newer else 'an older'} lowbit (this one reads format {FORMAT_VERSION}); "
            f"{'upgrade lowbit' if newer else 're-quantize the model'}"
        )
    for key, annotation in (("dtype", str), ("recipe", dict), ("modules", dict[str, dict])):
        if key not in config:
            raise LowbitError(f"{path} lacks {key!r}; {CONFIG_FIX}")
        check_value(config[key], annotation, str(path), CONFIG_FIX, key)
    if "tied_head" in config:
        check_record(config["tied_head"], TiedHead, str(path), CONFIG_FIX, "tied_head")
        embedding = config["modules"].get(config["tied_head"]["embedding"], {})
        if embedding.get("class") not in EMBEDDING_CLASSES:
            raise LowbitError(f"{path}: tied_head names an embedding that is not a quantized one; {CONFIG_FIX}")
    if config["dtype"] not in ("float16", "bfloat16", "float32", "float64"):
        raise LowbitError(f"{path}: dtype {config['dtype']!r} is not a float dtype lowbit loads (float16, bfloat16, "
                          f"float32, float64); {CONFIG_FIX}")
    try:
        Recipe.from_dict(config["recipe"], stored=True)
    except LowbitError as exc:
        raise LowbitError(f"{path}: {exc}") from None
    owners = {key.rpartition(".")[0] for key in CheckpointReader(folder).keys()}
    for name, entry in config["modules"].items():
        check_module_config(name, entry)
        if name not in owners:
            raise LowbitError(f"{path} names module {name!r}, for which the checkpoint holds no tensors; {CONFIG_FIX}")
    return config


def _module_or_none(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def load(
    folder: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", backend: str = "exact"
) -> nn.Module:
    """Rebuild a lowbit checkpoint: skeleton on meta, runtime modules swapped in, packed tensors loaded as stored
    (memory holds the packed bytes, never a float copy of the quantized weights).

    ``backend``: "exact" dequantizes in every forward and reproduces the calibration loop's output bit for bit;
    "fast" runs weight-only Linears whose grid fits PyTorch's int4 / int8 kernels on ``device`` through them (reduced
    precision), W8A8 / LLM.int8() Linears through int8 x int8 -> int32 matmuls (exact integer products), and keeps
    pruned Linears' dense weights (float speed, more memory: no CPU kernel gains from 2:4); see runtime/kernels.py
    for what bench/kernels.py measured and which kernels exist on CUDA. "dequantized" computes every quantized
    weight once at load and keeps it in float (float memory): the exact backend's outputs, bit for bit, at the float
    model's speed; evaluation (`lowbit eval`, `compare`) uses it."""
    if backend not in BACKENDS:
        raise LowbitError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    folder = Path(folder)
    config = read_lowbit_config(folder)
    dtype = dtype or getattr(torch, config.get("dtype", "float32"))
    lazy = LazyModel(folder, dtype)
    for name, module_config in config["modules"].items():
        kind = nn.Embedding if module_config["class"] in EMBEDDING_CLASSES else nn.Linear
        if not isinstance(_module_or_none(lazy.model, name), kind):
            raise LowbitError(
                f"{folder / LOWBIT_CONFIG} lists module {name!r}, which is not a {kind.__name__} of the model its "
                "config.json describes; the files do not belong together: re-run lowbit quantize"
            )
        lazy.model.set_submodule(name, build_empty(module_config, dtype))
    if "tied_head" in config:
        tie_quantized_head(lazy.model, config["tied_head"]["head"], config["tied_head"]["embedding"])
    lazy.verify_checkpoint()
    lazy.materialize("")
    model = lazy.model.to(device).eval()
    if backend == "dequantized":
        to_dequantized(model, dtype)
        release_freed_memory()  # the unpacked codes each weight was computed from
    if backend == "fast":
        switched = to_fast(model)
        log.info("fast backend: %d Linear(s) on PyTorch's low-bit kernels", switched)
        # the kernels' layouts were built from unpacked temporaries (one byte per code); glibc keeps such freed
        # heap memory resident until trimmed (`lowbit bench` reports the RSS growth at load that results)
        release_freed_memory()
    model.lowbit_info = LowbitInfo(Recipe.from_dict(config["recipe"], stored=True))
    return model


@dataclass
class OpenedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    load_seconds: float  # building the model and reading its weights (a GGUF's one-time conversion excluded)
    disk_bytes: int  # safetensors bytes of the checkpoint


def open_model(
    spec: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", backend: str = "exact"
) -> OpenedModel:
    """Any model lowbit accepts (embedded name, .gguf, HF folder, lowbit output) opened whole, with its tokenizer,
    for evaluation, generation and benchmarks."""
    source = resolve_model(spec)
    start = time.perf_counter()
    if source.is_lowbit:
        model = load(source.folder, dtype=dtype, device=device, backend=backend)
    else:
        lazy = LazyModel(source.folder, dtype or torch.float32)
        lazy.materialize("")
        model = lazy.model.to(device).eval()
    load_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(source.folder)
    return OpenedModel(model, tokenizer, source, load_seconds, CheckpointReader(source.folder).nbytes())
