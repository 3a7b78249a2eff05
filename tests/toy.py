"""The one shared toy-model module: tiny random models of every supported architecture, a byte-level tokenizer,
and Linear inputs with injected outlier channels. Everything builds in well under a second, offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GraniteConfig,
    JetMoeConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PhimoeConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Starcoder2Config,
)

VOCAB = 320
SPECIAL = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256, **SPECIAL,
)


_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def toy_config(model_type: str, biases: bool = True) -> PretrainedConfig:
    """A tiny config; where the architecture has the option, with biases on its Linears (HF's default has none,
    and a fold that mishandles a bias only shows when there is one)."""
    if model_type == "llama":
        return LlamaConfig(**_COMMON, attention_bias=biases, mlp_bias=biases)
    if model_type == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**_COMMON)  # q/k/v always have biases
    if model_type == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16, attention_bias=True)
    if model_type == "gemma":
        return GemmaConfig(**_COMMON, head_dim=16, attention_bias=True)
    if model_type == "gemma2":
        return Gemma2Config(**_COMMON, head_dim=16, attention_bias=True, query_pre_attn_scalar=16, **_SLIDING)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**_COMMON, head_dim=16, attention_bias=True, **_SLIDING)
    if model_type == "phi3":
        return Phi3Config(**_COMMON)
    if model_type == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, word_embed_proj_dim=64, **SPECIAL,
        )
    if model_type == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, **SPECIAL)
    # not in lowbit's table: granite and olmo have Llama's modules (olmo's norms have no weight); olmo2 (norms after
    # attention and MLP), cohere (attention and MLP in parallel) and starcoder2 (MLP c_fc/c_proj) do not
    if model_type == "granite":
        return GraniteConfig(**_COMMON, attention_bias=True, mlp_bias=True, residual_multiplier=0.5, attention_multiplier=0.2)
    if model_type == "olmo":
        return OlmoConfig(**_COMMON, attention_bias=True)
    if model_type == "olmo2":
        return Olmo2Config(**_COMMON, attention_bias=True)
    if model_type == "cohere":
        return CohereConfig(**_COMMON, attention_bias=True)
    if model_type == "starcoder2":
        return Starcoder2Config(**_COMMON, use_bias=True)
    # mixture of experts: 4 experts, 2 per token; Qwen2-MoE and DeepSeek-V3 with shared experts, DeepSeek-V3 after a
    # dense first layer as its checkpoints have (a stack of two builds of block)
    if model_type == "mixtral":
        return MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "phimoe":
        return PhimoeConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "olmoe":
        return OlmoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                              num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if model_type == "deepseek_v3":
        return DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        )
    if model_type == "jetmoe":
        return JetMoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            kv_channels=16, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                            vocab_size=VOCAB, max_position_embeddings=256, **SPECIAL)
    raise ValueError(model_type)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2")
# not in lowbit's architecture table: their structure is discovered (models/discover.py)
DISCOVERED = ("granite", "olmo", "olmo2", "cohere", "starcoder2")
# mixture of experts, experts split into Linears (models/experts.py)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v3")
UNSUPPORTED = ("jetmoe",)  # refused: its experts are a layout models/experts.py does not split


def toy_model(model_type: str, seed: int = 0, outliers: bool = True, biases: bool = True) -> torch.nn.Module:
    """A tiny random model; with ``outliers`` a few hidden channels of the embeddings are made ~30x larger, so
    activations carry the outlier channels real LLMs have (and the tests' outlier-aware methods have work to do)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(toy_config(model_type, biases)).eval()
    randomize_biases_and_norms(model, seed)
    if outliers:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, OUTLIER_CHANNELS] *= 30.0
    return model


@torch.no_grad()
def randomize_biases_and_norms(model: torch.nn.Module, seed: int) -> None:
    """Every norm weight its initial value + N(0, 0.2) (so Gemma's zero-initialised (1 + w) weights move off zero
    too), every norm bias ~ N(0, 0.1) (norm outputs are ~1) and every other bias ~ N(0, 0.02), the scale of HF's
    initial weights and of the toy's residual stream (larger ones drown the residual's injected outlier channels).
    HF initialises biases to 0 and norm weights to 1 (0 for Gemma), values on which a fold that forgets the bias
    or mistakes the norm's offset computes the same function as a correct one."""
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            bias.copy_(torch.randn(bias.shape, generator=generator) * (0.1 if is_norm else 0.02))
        weight = getattr(module, "weight", None)
        if is_norm and isinstance(weight, torch.nn.Parameter):
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.2)


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


def save_toy(model_type: str, folder: Path, seed: int = 0, biases: bool = True) -> Path:
    toy_model(model_type, seed, biases=biases).save_pretrained(folder)
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
