"""The one shared toy-model module: tiny random models of every supported architecture, a byte-level tokenizer,
and Linear inputs with injected outlier channels. Everything builds in well under a second, offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 320
SPECIAL = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256, **SPECIAL,
)


def toy_config(model_type: str) -> PretrainedConfig:
    if model_type == "llama":
        return LlamaConfig(**_COMMON)
    if model_type == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**_COMMON)
    if model_type == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if model_type == "phi3":
        return Phi3Config(**_COMMON)
    if model_type == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, word_embed_proj_dim=64, **SPECIAL,
        )
    if model_type == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, **SPECIAL)
    raise ValueError(model_type)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "opt", "gpt2")


def toy_model(model_type: str, seed: int = 0, outliers: bool = True) -> torch.nn.Module:
    """A tiny random model; with ``outliers`` a few hidden channels of the embeddings are made ~30x larger, so
    activations carry the outlier channels real LLMs have (and the tests' outlier-aware methods have work to do)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(toy_config(model_type)).eval()
    if outliers:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, OUTLIER_CHANNELS] *= 30.0
    return model


OUTLIER_CHANNELS = [3, 17, 40]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: 256 byte tokens plus <s> (256) and </s> (257). Needs no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def save_toy(model_type: str, folder: Path, seed: int = 0) -> Path:
    toy_model(model_type, seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def trained_toy(folder: Path, corpus: Path, steps: int = 150, outlier_scale: float = 30.0) -> Path:
    """A tiny Llama trained for a few seconds on ``corpus`` (so quantization error shows up in perplexity, unlike a
    random model's near-uniform predictions), then given outlier channels without changing its function: the
    norms feeding the Linears scale OUTLIER_CHANNELS up and the Linears' matching weight columns scale down (the
    inverse of SmoothQuant), the way real LLM outliers sit in norm weights."""
    torch.manual_seed(0)
    model = toy_model("llama", outliers=False).train()
    ids = torch.tensor(byte_tokenizer()(corpus.read_text())["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 64] for s in starts])  # [8, 64]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[OUTLIER_CHANNELS] *= outlier_scale
                parent = layer.self_attn if linears[0] == "q_proj" else layer.mlp
                for name in linears:
                    getattr(parent, name).weight[:, OUTLIER_CHANNELS] /= outlier_scale
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real numbers onto a small integer grid.\n\n"
    "Activation outliers stretch a min-max grid so far that ordinary values round to zero.\n\n"
    "GPTQ feeds rounding errors back through the inverse Hessian; AWQ scales salient channels.\n\n"
)


def write_corpus(path: Path, repeats: int = 60) -> Path:
    """A .txt file with many distinct paragraphs, so the 90/10 split leaves text in both parts."""
    paragraphs = [f"Paragraph {i}: {TEXT.split(chr(10) + chr(10))[i % 3]} Number {i * 7919 % 1000}." for i in range(repeats)]
    path.write_text("\n\n".join(paragraphs))
    return path


def calibration(n: int = 8, length: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=generator)


def outlier_inputs(tokens: int = 512, features: int = 256, seed: int = 0, scale: float = 50.0) -> torch.Tensor:
    """X [tokens, features] ~ N(0, 1) with 1% of channels scaled up (the LLM.int8()/SmoothQuant picture)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=generator)
    channels = torch.randperm(features, generator=generator)[: max(1, features // 100)]
    X[:, channels] *= scale
    return X


def random_weight(out_features: int = 128, in_features: int = 256, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) / in_features**0.5
