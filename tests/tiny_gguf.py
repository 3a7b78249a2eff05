"""Tiny random GGUF files of any architecture transformers' GGUF loader reads, in any GGML tensor type, written with
gguf-py (no lowbit code: the files are an independent reference for lowbit's GGUF importer; transformers is used only
for the metadata keys it reads and to read a config back).

A file is laid out the way llama.cpp's converter would write the tiny HF model it starts from (tests/toy.py):
gguf-py's own HF -> GGUF tensor name map, the inverse of every transform transformers' GGUF tensor processors undo
(Llama's q/k rotary permutation, Gemma's norm offset of 1, GPT-2's transposed Conv1D weights, MoE experts stacked
as separate gate/up/down tensors), config metadata under the keys transformers' ``GGUF_CONFIG_MAPPING`` reads, and
a minimal byte-level ("gpt2") tokenizer. So with F32 data, loading the file gives back the HF model's tensors.

Tensor data: 1-D tensors (norms, biases) are F32; every other tensor is in the requested GGML type, quantized
from the model's weights where gguf-py can quantize that type, otherwise random block bytes made finite by
clearing bit 0x40 of every byte (that clears the top exponent bit of every embedded scale: an fp16 one is then
below 2 in magnitude, an e8m0 or e4m3 one far inside float32's range). Random blocks exercise the dequantizer as
well as real ones do; only their values are meaningless.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, PretrainedConfig

from toy import SPECIAL, VOCAB, randomize_biases_and_norms, toy_config

# transformers' model_type -> the general.architecture llama.cpp writes for it
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "mistral": "llama"}
# llama.cpp writes Mistral as a llama; transformers reads it as Mistral when general.name is exactly "mistral"
GGUF_NAME = {"mistral": "mistral"}
# model_type -> the key of transformers' GGUF_CONFIG_MAPPING its metadata is read under (the file's keys are
# "{general.architecture}.{key}"; transformers renames them to this one)
CONFIG_SECTION = {"gemma3_text": "gemma3"}

# the types gguf-py can write from float values, and those it can read back as float values
QUANTIZABLE = tuple(t for t in T if t in (T.F32, T.F16) or (
    t in gguf.quants._type_traits and "quantize_blocks" in vars(gguf.quants._type_traits[t])))  # noqa: SLF001
DEQUANTIZABLE = tuple(t for t in T if t in (T.F32, T.F16) or t in gguf.quants._type_traits)  # noqa: SLF001


def tiny_model(model_type: str, width: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type``: tests/toy.py's config (2 layers) as transformers reads it back from a
    GGUF file's metadata, so values a GGUF cannot state (Qwen3's head_dim, the MoE expert widths, Gemma's and
    Qwen3's attention biases, ...) take the config class's defaults, as they do for any GGUF transformers loads.
    With ``width``: hidden and MLP sizes ``width`` and head_dim width / heads, so every 2-D weight's rows have
    ``width`` values (256 for the K-quant and 256-value IQ types; read back only where the GGUF states them)."""
    config = toy_config(model_type)
    if width is not None:
        heads = config.num_attention_heads
        overrides = {"hidden_size": width, "intermediate_size": width, "head_dim": width // heads}
        config = type(config).from_dict({**config.to_dict(), **overrides})
    config = as_gguf_states_it(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_biases_and_norms(model, seed)
    return model


def as_gguf_states_it(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` written as GGUF metadata alone and read back by transformers (tied head as in ``config``)."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as folder:
        writer = gguf.GGUFWriter(str(Path(folder) / "config.gguf"), gguf_arch(config.model_type))
        write_config(writer, gguf_arch(config.model_type), config)
        write_tokenizer(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        read = AutoConfig.from_pretrained(folder, gguf_file="config.gguf")
    read.tie_word_embeddings = config.tie_word_embeddings  # transformers reads it from output.weight's absence
    return read


def gguf_arch(model_type: str) -> str:
    return GGUF_ARCH.get(model_type, model_type)


def write_tiny_gguf(path: Path, model: torch.nn.Module, ggml_type: T, seed: int = 0, spm: bool = False) -> Path:
    """Write ``model`` (a tiny HF causal LM) as GGUF file ``path`` with its 2-D/3-D tensors in ``ggml_type``; ``spm``:
    with a SentencePiece vocabulary (``write_spm_tokenizer``) instead of the byte-level BPE one."""
    config = model.config
    arch_name = gguf_arch(config.model_type)
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch_name)
    write_config(writer, arch_name, config)
    (write_spm_tokenizer if spm else write_tokenizer)(writer)
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # a tied head is not stored (transformers reads "tied" from output.weight's absence)
        for gguf_name, array in gguf_tensors(names, hf_name, tensor.detach().float().numpy(), config):
            array = to_gguf_layout(arch_name, gguf_name, array, config)
            add_tensor(writer, gguf_name, array, ggml_type if array.ndim > 1 else T.F32, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(names: gguf.TensorNameMap, hf_name: str, array: np.ndarray, config: PretrainedConfig):
    """(GGUF name, array) for one HF tensor: one, or for stacked MoE gate_up experts [E, 2I, H] two [E, I, H]."""
    base, suffix = hf_name, ""
    if hf_name.endswith((".weight", ".bias")):
        base, suffix = hf_name.rsplit(".", 1)
        suffix = "." + suffix
    if m := re.fullmatch(r".*\.layers\.(\d+)\.mlp\.experts\.gate_up_proj", hf_name):
        half = array.shape[1] // 2
        return [(f"blk.{m[1]}.ffn_gate_exps.weight", array[:, :half]),
                (f"blk.{m[1]}.ffn_up_exps.weight", array[:, half:])]
    gguf_name = names.get_name(base)
    if gguf_name is None:
        raise ValueError(f"gguf-py names no GGUF tensor for {hf_name!r} ({config.model_type})")
    return [(gguf_name + (suffix or ".weight"), array)]


def permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k rotary permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def to_gguf_layout(arch_name: str, gguf_name: str, array: np.ndarray, config: PretrainedConfig) -> np.ndarray:
    """The inverse of transformers' GGUF tensor processor for ``arch_name`` (modeling_gguf_pytorch_utils.py)."""
    if arch_name == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads
        return permute(array, heads, heads if ".attn_q." in gguf_name else config.num_key_value_heads)
    if arch_name in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
        return array + np.float32(1)  # llama.cpp stores Gemma's (1 + w) norm weights whole
    if arch_name == "gpt2" and re.search(r"(attn_qkv|ffn_down|ffn_up|attn_output)\.weight$", gguf_name):
        return np.ascontiguousarray(array.T)  # HF's Conv1D stores [in, out]
    if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
        return array.reshape(-1)  # Qwen2-MoE's shared expert gate [1, H] is a vector in GGUF
    return np.ascontiguousarray(array)


def add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, ggml_type: T, rng: np.random.Generator) -> None:
    if ggml_type in QUANTIZABLE:
        data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)
        writer.add_tensor(name, data, raw_dtype=ggml_type if data.dtype == np.uint8 else None)
        return
    shape = gguf.quant_shape_to_byte_shape(array.shape, ggml_type)  # raises unless rows are whole blocks
    data = rng.integers(0, 256, shape, dtype=np.uint8) & np.uint8(0xBF)
    writer.add_tensor(name, data, raw_dtype=ggml_type)


def write_config(writer: gguf.GGUFWriter, arch_name: str, config: PretrainedConfig) -> None:
    """Every value transformers' GGUF_CONFIG_MAPPING reads for this architecture, from ``config``."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    section = CONFIG_SECTION.get(config.model_type, config.model_type)
    for key, attribute in GGUF_CONFIG_MAPPING[section].items():
        value = config_value(config, attribute) if attribute is not None else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint32(f"{arch_name}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch_name}.{key}", value)
        else:
            raise TypeError(f"config {attribute}={value!r}: not a GGUF scalar")
    writer.add_name(GGUF_NAME.get(config.model_type, f"tiny-{config.model_type}"))


def config_value(config: PretrainedConfig, attribute: str):  # noqa: ANN201
    if attribute == "rope_theta":  # transformers 5 keeps it in rope_parameters
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, attribute, None)


def write_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary of VOCAB tokens: the 256 bytes (GPT-2's printable spelling), toy.py's <s> and
    </s> at their ids, one merge ("Ġ Ġ" -> "ĠĠ"), and unused fillers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens += ["<s>", "</s>", "ĠĠ"]
    tokens += [f"<unused{i}>" for i in range(len(tokens), VOCAB)]
    assert tokens.index("<s>") == SPECIAL["bos_token_id"] and tokens.index("</s>") == SPECIAL["eos_token_id"]
    types = [gguf.TokenType.CONTROL if t in ("<s>", "</s>") else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_bos_token_id(SPECIAL["bos_token_id"])
    writer.add_eos_token_id(SPECIAL["eos_token_id"])
    writer.add_pad_token_id(SPECIAL["pad_token_id"])


def write_spm_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A SentencePiece ("llama") vocabulary of VOCAB tokens, as llama.cpp writes Gemma's and Llama 2's: the 256 byte
    tokens, toy.py's <s> and </s> at their ids, <unk>, then pieces whose scores fall with their merge order."""
    pieces = ["\u2581", *"etaoinshrdlu", "\u2581t", "he", "\u2581the", "in", "er", "\u2581a", "on", "re"]
    tokens = [f"<0x{b:02X}>" for b in range(256)] + ["<s>", "</s>", "<unk>"] + pieces
    tokens += [f"\u2581{a}{b}" for a in "etaoinsh" for b in "etaoinsh"][: VOCAB - len(tokens)]
    assert len(tokens) == VOCAB and tokens.index("<s>") == SPECIAL["bos_token_id"]
    types = [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.UNKNOWN]
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(VOCAB - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(SPECIAL["bos_token_id"])
    writer.add_eos_token_id(SPECIAL["eos_token_id"])
    writer.add_unk_token_id(258)
    writer.add_pad_token_id(SPECIAL["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


def assert_gguf_gives_lowbits_logits(loaded: torch.nn.Module, path: Path) -> None:
    """transformers' reader of GGUF file ``path`` gives ``loaded``'s logits (a lowbit model), to 1e-4 of their range."""
    from lowbit.api import open_model
    from toy import calibration

    ids = calibration(n=2, length=24, seed=5)
    with torch.no_grad():
        ours = loaded(ids).logits
        theirs = open_model(str(path)).model(ids).logits
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()
