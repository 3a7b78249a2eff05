"""Convert a GGUF file once into a cached Hugging Face folder (safetensors shards + config + tokenizer), streaming:
one tensor in memory at a time.

transformers loads a GGUF by building the whole model in float32 and dequantizing every tensor into it (a 1.5B
Q4_K GGUF peaked at 9.3 GB of RSS; a 7B one would need ~40 GB). Here the file is memory-mapped (gguf's reader),
each tensor is dequantized, passed through transformers' own per-architecture tensor processor and name map (the
same code its loader runs, so the tensors are the ones it would load: q/k rotary un-permutation, renames), and its
bytes written to the shard file before the next is read (io/stream_shards.py). Only the config, the tokenizer and
the name map come from transformers' metadata reading; the model is a meta-device skeleton. The GGUF's own tokenizer
keys are kept as well, in tokenizer.gguf (models/gguf_tokenizer_fields.py), for a GGUF export.

The cache is bfloat16 by default, half of float32 on disk and when read (a 7B model: 13.5 GB instead of 27 GB);
``LOWBIT_GGUF_DTYPE=float32`` (or ``dtype=torch.float32``) keeps the dequantized values exactly (a Q4_K value
d * sc * q - dmin * m needs about 20 significant bits; bfloat16 has 8, so each weight moves by at most 2^-9 of
itself, 1/100 of a 4-bit grid step: the embedded SmolLM2's perplexity goes from 13.1479 to 13.1486).

The cache key is the file's sha256, so a changed file is never served stale; an entry is reused only when its
import record matches the file and its weights (see ``cache_entry_is_valid``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_directory
from lowbit.models.checkpoint import all_finite
from lowbit.models.embedded import cache_dir, file_sha256
from lowbit.models.gguf_tokenizer_fields import TOKENIZER_GGUF, write_tokenizer_gguf

log = logging.getLogger(__name__)
IMPORT_RECORD = "lowbit_import.json"  # written last: which GGUF the entry came from and which tensors it holds
IMPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_VARIABLE = "LOWBIT_GGUF_DTYPE"


def default_import_dtype() -> torch.dtype:
    """bfloat16, or what ``LOWBIT_GGUF_DTYPE`` names."""
    name = os.environ.get(DTYPE_VARIABLE, "bfloat16")
    if name not in IMPORT_DTYPES:
        raise LowbitError(f"{DTYPE_VARIABLE}={name!r} is not an import dtype; set it to one of: {', '.join(IMPORT_DTYPES)}")
    return IMPORT_DTYPES[name]


def import_gguf(path: Path, sha256: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Return the cached HF folder for GGUF ``path`` in ``dtype`` (default: ``default_import_dtype()``), converting
    it on first use (or when the cached entry does not validate: written by an older lowbit, edited, truncated)."""
    dtype = dtype or default_import_dtype()
    dtype_name = str(dtype).removeprefix("torch.")
    digest = sha256 or file_sha256(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}-{dtype_name}"
    if cache_entry_is_valid(folder, digest, dtype_name):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a %s Hugging Face folder in %s (once)", path.name, dtype_name, folder)
    with atomic_directory(folder, overwrite=True, inputs=[path], wait=True) as tmp:
        tensors, kept = _convert(path, tmp, dtype)
        record = {"gguf_sha256": digest, "dtype": dtype_name, "tensors": tensors, "tokenizer_kept": kept}
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
    return folder


def cache_entry_is_valid(folder: Path, digest: str, dtype_name: str) -> bool:
    """The entry was converted from this very file to this dtype, its weight files hold exactly the tensors written
    (names from the shards' headers, which a truncated shard fails to give), its config names the model class and its
    record says whether the file's own tokenizer keys were kept (entries of lowbit before either did not)."""
    from lowbit.models.checkpoint import CheckpointReader

    try:
        record = json.loads((folder / IMPORT_RECORD).read_text())
        config = json.loads((folder / "config.json").read_text())
        names = sorted(CheckpointReader(folder).keys())
    except (OSError, ValueError, SafetensorError, LowbitError):
        return False
    return (isinstance(record, dict) and record.get("gguf_sha256") == digest and record.get("dtype") == dtype_name
            and record.get("tensors") == names and isinstance(config, dict) and bool(config.get("architectures"))
            and isinstance(record.get("tokenizer_kept"), bool)
            and record["tokenizer_kept"] == (folder / TOKENIZER_GGUF).is_file())


SHARD_BYTES = 2 << 30  # shards are written tensor by tensor, so their size costs disk files, not memory
CHUNK_VALUES = 1 << 18  # values dequantized (and checked) per step: gguf's numpy dequantizers allocate several
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


def as_tensor(array, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001 (numpy float32)
    """A processed float32 array as a ``dtype`` tensor without a second full-size buffer: an array of its own is
    narrowed in place; a read-only view into the memory map (an F32 source tensor) is cast, which only reads it; a
    processor's transposed view is copied once."""
    import warnings

    import numpy as np

    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # a processor's transposed view: its rows in order
    if dtype == torch.float32:
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    if array.flags.writeable:
        return narrowed_in_place(torch.from_numpy(array), dtype)
    with warnings.catch_warnings():  # the non-writable warning: the cast below reads the array, never writes it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(dtype)


def narrowed_in_place(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values.to(dtype)`` for a 2-byte ``dtype``, written over the first half of ``values``' own buffer (which
    stays allocated until the result is freed). Chunk i's 2-byte values land on bytes [2ic, 2ic + 2c), which only
    chunks < i occupied as float32 (chunk 0 is converted before it is written), so nothing is overwritten before it
    is read; peak memory is the float32 tensor plus one chunk, not 1.5x it."""
    flat = values.reshape(-1)  # float32 [n], contiguous
    narrow = flat.view(torch.int16)[: flat.numel()].view(dtype)  # the same bytes seen as n 2-byte slots
    for start in range(0, flat.numel(), CHUNK_VALUES):
        chunk = flat[start : start + CHUNK_VALUES].to(dtype)  # a copy: read before anything is written
        narrow[start : start + chunk.numel()] = chunk
    return narrow.view(values.shape)


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


def _convert(path: Path, out: Path, dtype: torch.dtype = torch.float32) -> tuple[list[str], bool]:
    """Write the HF folder tensor by tensor, floats in ``dtype``; returns the names of the tensors written and whether
    the file's own tokenizer keys were kept (tokenizer.gguf).
    Memory beyond the floor (modules, metadata, skeleton): the largest tensor in float32, plus its ``dtype`` copy."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

    from lowbit.io.stream_shards import StreamingShardWriter
    from lowbit.pipeline.memory import long_lived_objects_frozen, release_freed_memory

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
    writer = StreamingShardWriter(out, SHARD_BYTES)
    written: list[str] = []

    def add(name: str, tensor: torch.Tensor) -> None:
        if not all_finite(tensor):
            raise LowbitError(f"GGUF file {path}: tensor {name!r} has NaN or inf values; the file is corrupt")
        writer.add(name, tensor)
        written.append(name)

    with long_lived_objects_frozen():  # the reader's ~10^6 field objects: each collection would scan them
        parsed["tensors"] = {}  # where transformers' MoE processors assemble stacked experts over several tensors
        for tensor in reader.tensors:
            weights = dequantized(tensor, dequantize)  # float32 [rows, ...]: one tensor at a time
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                       parsed_parameters=parsed)
            if result.name in names:
                name, array = names[result.name], result.weights  # float32 numpy [rows, ...]
                del weights, result
                tensor_out = as_tensor(array, dtype)
                del array  # the float32 original goes before the bytes are written
                add(name, tensor_out)
                del tensor_out
            else:
                del weights, result
            release_mapped_pages(reader)
            release_freed_memory()  # glibc keeps freed large arrays resident unless trimmed
        for name, stacked in parsed.pop("tensors").items():
            add(name, stacked.to(dtype))
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
    config.dtype = dtype  # what the shards hold (transformers' own GGUF loading would say float32)
    config.architectures = [type(skeleton).__name__]  # as every Hub folder names it (llama.cpp's converter needs it)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    kept = write_tokenizer_gguf(reader, out)  # its own tokenizer keys, for a GGUF export (tokenizer.json is lossy)
    return sorted(written), kept

