"""How llama.cpp holds each model family lowbit exports to GGUF: its architecture name and tensor names, the rows
and norms it stores differently from transformers, the keys its graph reads beyond the shared ones, and the configs
whose forward its graph would compute otherwise (refused, never written).

Facts from llama.cpp's converter (convert_hf_to_gguf.py, conversion/) and its model loaders (src/models/*.cpp) of
the version bench/llamacpp builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError

_NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Gemma 3's four norms per block: before and after attention, before and after the MLP
_SANDWICH_NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp holds one model family: its architecture name, whether q/k rows are permuted into its rotary
    layout (the Llama family's interleaved rope; Qwen's and Gemma's NEOX rope reads them as stored), which Linears
    may carry biases, whether the attention has q/k norms, the block's norms by name, what llama.cpp adds to every
    norm weight (Gemma's norms scale by 1 + weight in transformers, by the stored weight in llama.cpp), and whether
    its SentencePiece text starts with a space (Gemma's does not)."""

    name: str
    permute_qk: bool
    biases: tuple[str, ...] = ()
    qk_norm: bool = False
    norms: tuple[tuple[str, str], ...] = tuple(_NORM_NAMES.items())
    norm_offset: float = 0.0
    space_prefix: bool | None = None  # a SentencePiece vocabulary's add_space_prefix (None: llama.cpp's default)

    @property
    def norm_tensors(self) -> set[str]:
        """The GGUF names (without ``blk.N.``) of every norm weight, the final one included."""
        return {gg for _, gg in self.norms} | set(_QK_NORM_NAMES.values()) | {"output_norm"}


GGUF_ARCHITECTURES = {
    "llama": GGUFArch("llama", True),
    "mistral": GGUFArch("llama", True),
    "qwen2": GGUFArch("qwen2", False, ("attn_q", "attn_k", "attn_v")),
    "qwen3": GGUFArch("qwen3", False, qk_norm=True),
    "gemma3_text": GGUFArch("gemma3", False, qk_norm=True, norms=tuple(_SANDWICH_NORM_NAMES.items()), norm_offset=1.0,
                            space_prefix=False),
    "phi3": GGUFArch("phi3", False),  # fused q/k/v and gate/up Linears, stored fused as llama.cpp reads them
}
_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    # Phi-3: [q; k; v] rows in one Linear, and [gate; up] rows, whose halves llama.cpp's SwiGLU splits the same way
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
}
_QK_NORM_NAMES = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
ARCHITECTURES_HELD = "GGUF export supports the Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text) and Phi-3 architectures"


def no_biases(model_type: str) -> str:
    """The refusal of Linear biases llama.cpp's graph for ``model_type`` has no place for (transformers' reader would
    drop them too)."""
    held = GGUF_ARCHITECTURES[model_type].biases
    where = f"only {', '.join(held)} biases" if held else "no Linear biases"
    return (f"this {model_type} model has Linear biases its llama.cpp architecture cannot hold ({where}); "
            "export compressed-tensors")


def gguf_arch(model_type: str) -> GGUFArch:
    if model_type not in GGUF_ARCHITECTURES:
        raise LowbitError(f"{ARCHITECTURES_HELD} ({', '.join(GGUF_ARCHITECTURES)}); this is {model_type!r}. "
                          "Use lowbit's own output folder or compressed-tensors for it")
    return GGUF_ARCHITECTURES[model_type]


def gguf_tensor_names(config: Any) -> dict[str, str]:
    """HF module/parameter name -> GGUF tensor name."""
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    arch = gguf_arch(config.model_type)
    per_block = {**_LINEAR_NAMES, **dict(arch.norms)}
    if arch.qk_norm:
        per_block.update(_QK_NORM_NAMES)
    for i in range(config.num_hidden_layers):
        for hf, gg in per_block.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def check_gemma3(config: dict[str, Any]) -> None:
    """Refuse a Gemma 3 text config whose forward llama.cpp's gemma3 graph would compute otherwise."""
    name = "this Gemma 3 model"
    if config.get("attn_logit_softcapping") is not None:
        raise LowbitError(f"{name} caps attention logits, which llama.cpp's gemma3 graph does not; "
                          "export compressed-tensors")
    if config.get("use_bidirectional_attention"):
        raise LowbitError(f"{name} attends bidirectionally (an embedding model), which llama.cpp's gemma3 graph does "
                          "not; export compressed-tensors")
    # transformers' defaults where config.json leaves them out: head_dim 256, query_pre_attn_scalar 256
    head_dim, scalar = config.get("head_dim") or 256, config.get("query_pre_attn_scalar") or 256
    # llama.cpp scales queries by 1/sqrt(head_dim), except for its 27B (62 layers): 1/sqrt(hidden / heads)
    llama_scalar = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 \
        else head_dim
    if scalar != llama_scalar:
        raise LowbitError(f"{name} scales queries by query_pre_attn_scalar={scalar}, llama.cpp by {llama_scalar}; "
                          "export compressed-tensors")
    for layer_type, rope in _gemma3_rope(config).items():
        kind = rope.get("rope_type", "default")
        if kind not in ("default", "linear") or (kind == "linear" and layer_type == "sliding_attention"):
            raise LowbitError(f"{name}'s {layer_type} layers use {kind!r} rope scaling; llama.cpp's gemma3 takes "
                              "linear scaling on full-attention layers only. Export compressed-tensors")


def check_phi3(config: dict[str, Any]) -> None:
    """Refuse a Phi-3 whose rope llama.cpp would compute otherwise: the LongRoPE factors of the long-context variants
    (Phi-3-*-128k, Phi-3.5, Phi-4-mini) are not written by lowbit; the plain-rope ones (Phi-3-*-4k, Phi-4) are."""
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type", "default")
    if kind not in ("default", None) or params.get("long_factor") or scaling.get("long_factor"):
        raise LowbitError(f"this Phi-3 model uses {kind!r} rope scaling (a long-context variant), whose rope factors "
                          "lowbit's GGUF export does not write; export compressed-tensors")


def _gemma3_rope(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type ("full_attention", "sliding_attention") of a Gemma 3 config, in the per-type
    form transformers 5 writes (older configs: rope_theta, rope_local_base_freq, rope_scaling)."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        return params
    full = dict(config.get("rope_scaling") or {})
    full["rope_theta"] = config.get("rope_theta", 1_000_000.0)
    return {"full_attention": full, "sliding_attention": {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}}


def add_gemma3_metadata(writer: Any, config: Any) -> None:
    """Gemma 3's keys beyond the shared ones: the sliding window, which layers use it (written per layer, so any
    pattern is read as transformers has it, not llama.cpp's default of every sixth layer global), the sliding layers'
    rope base, linear rope scaling of the global layers, and the final logit soft-cap."""
    import gguf

    rope = _gemma3_rope(config.to_dict())
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if rope["full_attention"].get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["full_attention"]["factor"]))
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


_CONFIG_CHECKS = {"gemma3_text": check_gemma3, "phi3": check_phi3}


def check_config(model_type: str, config: dict[str, Any]) -> None:
    """Refuse a config (config.json's dict) of ``model_type`` whose forward llama.cpp would compute otherwise."""
    check = _CONFIG_CHECKS.get(model_type)
    if check is not None:
        check(config)


def add_arch_metadata(writer: Any, config: Any) -> None:  # noqa: ANN401 (gguf's GGUFWriter, a transformers config)
    """The rope base and every key the family's llama.cpp graph reads beyond the shared ones."""
    if config.model_type == "gemma3_text":
        writer.add_rope_freq_base(float(_gemma3_rope(config.to_dict())["full_attention"]["rope_theta"]))
        add_gemma3_metadata(writer, config)
        return
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    if config.model_type == "phi3":
        # llama.cpp's converter writes 0 for no window; llama.cpp's phi3 graph attends over everything either way
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
