"""Convert a GGUF file once into a cached Hugging Face folder (float32 safetensors shards + config + tokenizer),
streaming: one tensor in memory at a time.

transformers loads a GGUF by building the whole model in float32 and dequantizing every tensor into it (a 1.5B
Q4_K GGUF peaked at 9.3 GB of RSS; a 7B one would need ~40 GB). Here the file is memory-mapped (gguf's reader),
each tensor is dequantized, passed through transformers' own per-architecture tensor processor and name map (the
same code its loader runs, so the tensors are the ones it would load: q/k rotary un-permutation, renames), and
written to a shard of at most ``SHARD_BYTES`` before the next is read. Only the config, the tokenizer and the
name map come from transformers' metadata reading; the model is a meta-device skeleton. float32 keeps the
dequantized values exactly (a Q8_0 or Q4_K value d * q is not exact in bfloat16).

The cache key is the file's sha256, so a changed file is never served stale; an entry is reused only when its
import record matches the file and its weights (see ``cache_entry_is_valid``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory
from lowbit.models.embedded import cache_dir, file_sha256

log = logging.getLogger(__name__)
IMPORT_RECORD = "lowbit_import.json"  # written last: which GGUF the entry came from and which tensors it holds


def import_gguf(path: Path, sha256: str | None = None) -> Path:
    """Return the cached HF folder for GGUF ``path``, converting it on first use (or when the cached entry does not
    validate: written by an older lowbit, edited, or truncated)."""
    digest = sha256 or file_sha256(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if cache_entry_is_valid(folder, digest):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a Hugging Face folder in %s (once)", path.name, folder)
    with atomic_directory(folder, overwrite=True, inputs=[path], wait=True) as tmp:
        tensors = _convert(path, tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps({"gguf_sha256": digest, "tensors": tensors}, indent=2))
    return folder


def cache_entry_is_valid(folder: Path, digest: str) -> bool:
    """The entry was converted from this very file, and its weight files hold exactly the tensors written."""
    from lowbit.models.checkpoint import CheckpointReader

    try:
        record = json.loads((folder / IMPORT_RECORD).read_text())
        names = sorted(CheckpointReader(folder).keys())
    except (OSError, ValueError, SafetensorError, LowbitError):
        return False
    return isinstance(record, dict) and record.get("gguf_sha256") == digest and record.get("tensors") == names


SHARD_BYTES = 256 << 20  # a shard is written once this much is collected: the import's memory beyond one tensor
CHUNK_VALUES = 1 << 22  # values dequantized (and checked) per step: gguf's numpy dequantizers allocate several
# temporaries the size of their output, so a whole 150k-token embedding at once would cost ~3x its float32 size


def release_mapped_pages(reader) -> None:  # noqa: ANN001 (gguf's GGUFReader)
    """Drop the file pages read so far from this process's resident memory (they are re-read from the file if
    touched again): a memory map keeps every page it touched resident, which over a whole file is its size."""
    import mmap

    mapped = getattr(getattr(reader, "data", None), "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def dequantized(tensor, dequantize):  # noqa: ANN001, ANN201 (gguf's ReaderTensor and function; numpy out)
    """A GGUF tensor dequantized to float32, a block of rows at a time into one preallocated array."""
    import numpy as np

    data = tensor.data  # memory-mapped: quantized blocks [rows, bytes per row], or plain values
    first = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    rows = max(1, CHUNK_VALUES // max(1, first.size))
    for start in range(0, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], tensor.tensor_type)
    return out


def _read_metadata(path: Path):
    """(config, tokenizer, metadata parsed by transformers) of a GGUF, without reading its tensors."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        config = AutoConfig.from_pretrained(path.parent, trust_remote_code=False, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False, **kwargs)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as exc:  # transformers/gguf raise many types for a bad file; all mean the same to the user
        raise LowbitError(
            f"cannot read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}; the file is corrupt, "
            "truncated, or of an architecture transformers cannot load"
        ) from None
    return config, tokenizer, parsed


def _convert(path: Path, out: Path) -> list[str]:
    """Write the HF folder tensor by tensor; returns the names of the tensors written."""
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

    from lowbit.io.writer import ShardWriter
    from lowbit.pipeline.memory import release_freed_memory

    config, tokenizer, parsed = _read_metadata(path)
    with init_empty_weights(include_buffers=True):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    try:
        reader = GGUFReader(str(path))  # memory-mapped: tensors are read when dequantized
        architecture = read_field(reader, "general.architecture")[0]  # transformers keys its processors by it
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        names = get_gguf_hf_weights_map(skeleton, processor)
    except Exception as exc:  # an architecture gguf-py does not name, a malformed tensor table
        raise LowbitError(f"cannot read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    expected = skeleton.state_dict()
    writer = ShardWriter(out)
    batch: dict[str, torch.Tensor] = {}
    written: list[str] = []

    def flush() -> None:
        if batch:
            writer.write(f"model-{len(set(writer.weight_map.values())) + 1:05d}.safetensors", dict(batch))
            written.extend(batch)
            batch.clear()
            release_freed_memory()  # glibc keeps freed large arrays resident unless trimmed

    def add(name: str, tensor: torch.Tensor) -> None:
        if not all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(CHUNK_VALUES)):
            raise LowbitError(f"GGUF file {path}: tensor {name!r} has NaN or inf values; the file is corrupt")
        batch[name] = tensor.contiguous()
        if sum(t.numel() * t.element_size() for t in batch.values()) >= SHARD_BYTES:
            flush()

    parsed["tensors"] = {}  # where transformers' MoE processors assemble stacked experts over several tensors
    for tensor in reader.tensors:
        weights = dequantized(tensor, dequantize)  # float32 [rows, ...]: one tensor at a time
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                   parsed_parameters=parsed)
        if result.name in names:
            array = result.weights
            owned = array.flags.writeable and array.flags.c_contiguous  # not a view into the memory map
            add(names[result.name], torch.from_numpy(array if owned else np.array(array)).float())
        del weights, result
        release_mapped_pages(reader)
    for name, stacked in parsed.pop("tensors").items():
        add(name, stacked.float())
    flush()
    writer.finish()
    tied = "lm_head.weight" if getattr(config, "tie_word_embeddings", False) else None
    # transformers would initialise a parameter the file lacks at random and go on: lowbit would quantize noise
    missing = sorted(set(expected) - set(written) - {tied})
    from lowbit.models.checkpoint import CheckpointReader

    shapes = CheckpointReader(out)  # the shards' headers, read once
    wrong = sorted(n for n in written if n in expected and shapes.shape(n) != tuple(expected[n].shape))
    if missing or wrong:
        example = (missing or wrong)[0]
        raise LowbitError(
            f"GGUF file {path} lacks {len(missing) + len(wrong)} tensor(s) its architecture needs, e.g. {example!r} "
            "(renamed, missing or of the wrong shape); the file is corrupt or was written for another architecture"
        )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sorted(written)

