"""llama.cpp's K-quant mixes (Q4_K_M, Q5_K_S, ...): which K type each Linear of a dense decoder gets, by its role and
layer, as llama-quantize chooses them (llama.cpp's src/llama-quant.cpp, llama_tensor_get_type_impl; the rules for
Falcon, mixture-of-experts, 70B-class and IQ types are not carried over). A width that is not a multiple of 256 then
falls back as every K type does (numerics/kquant.py).

    mix      base   attn_v                                ffn_down                                attn_output
    Q2_K_S   Q2_K   Q4_K if 4+ query heads per kv head    Q4_K in the first 1/8                   base
    Q2_K_M   Q2_K   Q4_K if 4+ query heads per kv head,   Q3_K                                    Q3_K
                    else Q3_K
    Q3_K_S   Q3_K   base                                  base                                    base
    Q3_K_M   Q3_K   Q5_K in layers 0-1, else Q4_K         Q5_K in the first 1/16, else Q4_K       Q4_K
    Q3_K_L   Q3_K   Q5_K                                  Q5_K                                    Q5_K
    Q4_K_S   Q4_K   Q5_K in layers 0-3                    Q5_K in the first 1/8                   base
    Q4_K_M   Q4_K   Q6_K where more bits help (below)     Q6_K where more bits help               base
    Q5_K_S   Q5_K   base                                  base                                    base
    Q5_K_M   Q5_K   Q6_K where more bits help             Q6_K where more bits help               base
"Where more bits help": the first and last eighth of the layers, and every third layer between them.
Every other Linear gets the base type. Outside the blocks (``table_type``): the output head, and an embedding tied to
it, is Q6_K (Q8_0 where its width is not a multiple of 256); an untied input embedding gets the base type, which falls
back like a Linear's.
Q2_K_M is llama-quantize's ``Q2_K`` ftype under another name: lowbit's ``q2_k``, like ``q3_k`` .. ``q6_k``, puts every
Linear on that one type (``LLAMA_FTYPES`` maps the names back).
"""

from __future__ import annotations

from dataclasses import dataclass

K_MIXES: dict[str, str] = {
    "Q2_K_S": "Q2_K", "Q2_K_M": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
}
# llama-quantize's name of each mix where it differs from lowbit's (its Q2_K is a mix; lowbit's q2_k is not)
LLAMA_FTYPES: dict[str, str] = {"Q2_K_M": "Q2_K"}
# a Linear's role in llama.cpp's terms, from the last part of its path (the Llama family's module names)
ROLES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    # Phi-3's fused Linears: llama.cpp gives attn_qkv attn_v's types (category_is_attn_v) and names gate/up ffn_up
    "qkv_proj": "attn_v", "gate_up_proj": "ffn_up",
}


@dataclass(frozen=True)
class LinearPlace:
    """Where a Linear sits: its ``path`` inside its block, the block's ``layer`` index of ``n_layers``, and the model's
    ``n_gqa``: query heads per key/value head (llama.cpp's n_gqa; the Q2_K mixes give attn_v more bits from 4)."""

    path: str
    layer: int
    n_layers: int
    n_gqa: int = 1

    @property
    def role(self) -> str:
        return ROLES.get(self.path.rsplit(".", 1)[-1], "")


def table_type(mix: str, head: bool) -> str:
    """The K type of a table outside the blocks in ``mix``: the output head (``head``; a tied embedding is quantized
    as the head) gets Q6_K, an untied input embedding the mix's base type (llama.cpp's rules for OUTPUT and
    TOKEN_EMBD; a width that is not a multiple of 256 falls back, the head to Q8_0)."""
    return "Q6_K" if head else K_MIXES[mix]


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between them."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_type(mix: str, place: LinearPlace) -> str:
    """The K type the Linear at ``place`` gets in ``mix``."""
    base = K_MIXES[mix]
    role, i, n = place.role, place.layer, place.n_layers
    if role == "attn_v":
        if mix == "Q2_K_M":
            return "Q4_K" if place.n_gqa >= 4 else "Q3_K"
        if mix == "Q2_K_S" and place.n_gqa >= 4:
            return "Q4_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            return "Q6_K"
        if mix == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif role == "ffn_down":
        if mix == "Q2_K_M":
            return "Q3_K"
        if mix == "Q2_K_S" and i < n // 8:
            return "Q4_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            return "Q6_K"
        if mix == "Q4_K_S" and i < n // 8:
            return "Q5_K"
    elif role == "attn_output":
        if mix == "Q2_K_M":
            return "Q3_K"
        if mix == "Q3_K_M":
            return "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
    return base
