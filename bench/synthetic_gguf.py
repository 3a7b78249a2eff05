"""A GGUF file of Llama-2-7B's shape with random Q4_K weights, for measuring import and quantization at a size whose
float32 form (27 GB) does not fit in this machine's 24 GiB of RAM.

Shape: hidden 4096, 32 blocks, 32 heads (no grouped KV), MLP 11008, untied output head, RMSNorm eps 1e-5, rope base
10000; the tokenizer is the embedded SmolLM2's (copied from its GGUF), so the vocabulary is 49152 tokens instead of
Llama-2's 32000 (6.9B parameters instead of 6.7B). Matrices are Q4_K (256-value super-blocks, as llama.cpp's
Q4_K_M stores most of a 7B model), norms F32. Written tensor by tensor (gguf's streaming writer): memory stays at
one tensor.

Each Q4_K super-block is random but shaped like a trained weight: the eight sub-block scales and mins are equal
(6-bit value 15) and dmin = 7.5 d, so a value is d * 15 * (q - 7.5) with q uniform in 0..15: zero mean, standard
deviation about 0.02 (d drawn per super-block around 3e-4).

Usage: .venv/bin/python bench/synthetic_gguf.py OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HIDDEN, BLOCKS, HEADS, MLP, CONTEXT = 4096, 32, 32, 11008, 4096
Q4_K_BLOCK_VALUES, Q4_K_BLOCK_BYTES = 256, 144  # d f16, dmin f16, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles


def q4_k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K data for a [rows, cols] matrix: uint8 [rows, cols / 256 * 144] (gguf's raw layout)."""
    count = rows * cols // Q4_K_BLOCK_VALUES
    blocks = np.empty((count, Q4_K_BLOCK_BYTES), dtype=np.uint8)
    d = rng.uniform(2e-4, 4e-4, count).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(count, 2)
    blocks[:, 2:4] = (d.astype(np.float32) * 7.5).astype(np.float16).view(np.uint8).reshape(count, 2)
    scale = 15  # < 16, so the 4 high bits ggml keeps for sub-blocks 4-7 are zero and every sub-block reads 15
    blocks[:, 4:12] = scale
    blocks[:, 12:16] = scale | (scale << 4)
    blocks[:, 16:] = rng.integers(0, 256, (count, Q4_K_BLOCK_BYTES - 16), dtype=np.uint8)
    return blocks.reshape(rows, cols // Q4_K_BLOCK_VALUES * Q4_K_BLOCK_BYTES)


def tensor_plan(vocab: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(GGUF name, [rows, cols] or [n]) in llama.cpp's order."""
    plan: list[tuple[str, tuple[int, int] | tuple[int]]] = [("token_embd.weight", (vocab, HIDDEN))]
    for i in range(BLOCKS):
        plan += [(f"blk.{i}.attn_norm.weight", (HIDDEN,))]
        plan += [(f"blk.{i}.attn_{p}.weight", (HIDDEN, HIDDEN)) for p in ("q", "k", "v", "output")]
        plan += [(f"blk.{i}.ffn_norm.weight", (HIDDEN,))]
        plan += [(f"blk.{i}.ffn_{p}.weight", (MLP, HIDDEN)) for p in ("gate", "up")]
        plan += [(f"blk.{i}.ffn_down.weight", (HIDDEN, MLP))]
    return plan + [("output_norm.weight", (HIDDEN,)), ("output.weight", (vocab, HIDDEN))]


def main() -> int:
    import gguf

    from lowbit.models.embedded import EMBEDDED_MODELS

    out = Path(sys.argv[1])
    source = gguf.GGUFReader(str(EMBEDDED_MODELS["smollm2-135m"].verified_path()))
    tokens = source.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("synthetic-llama-2-7b-shape")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, field in source.fields.items():  # the tokenizer, as the embedded model ships it
        if name.startswith("tokenizer."):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), value_type, sub_type)
    plan = tensor_plan(vocab)
    for name, shape in plan:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            rows, cols = shape
            nbytes = rows * cols // Q4_K_BLOCK_VALUES * Q4_K_BLOCK_BYTES
            writer.add_tensor_info(name, (rows, cols // Q4_K_BLOCK_VALUES * Q4_K_BLOCK_BYTES), np.dtype(np.uint8),
                                   nbytes, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in plan:  # one tensor in memory at a time
        if len(shape) == 1:
            writer.write_tensor_data(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            writer.write_tensor_data(q4_k_blocks(*shape, rng))
    writer.close()
    print(f"{out}: {out.stat().st_size / 2**30:.2f} GiB, {len(plan)} tensors, vocabulary {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
