"""The one declarative table of supported architectures.

Linear layers are discovered generically (every ``nn.Linear`` inside a decoder block). What cannot be
discovered is described here per ``model_type``:
  * where the decoder blocks live,
  * the scale groups ``(previous op -> Linears it feeds)`` that SmoothQuant and AWQ fold scales through, with the
    sub-module whose output AWQ compares,
  * the true-sequential stages GPTQ quantizes in order (each stage sees inputs from the already quantized ones).
A group that resolves to nothing raises an error naming the model type and the missing module. A model type the
table does not name gets an entry discovered from the model itself (``models/discover.py``); every fold is proven
on the block's own outputs before it is kept (``pipeline/fold.py``), so an entry that is wrong for a model costs
that model its smoothing, never its correctness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` (a norm or a Linear, path inside the block) feeds ``linears``; AWQ replays ``inspect``.

    ``inspect`` None means the group's single Linear is its own inspected module. ``optional`` groups are
    skipped when their shapes do not allow folding (e.g. v_proj -> o_proj under grouped-query attention).
    ``passengers`` read the same input but stay float (mixture-of-experts routers): a fold scales their weight
    columns too, so they compute what they did.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    optional: bool = False
    passengers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arch:
    blocks: str
    groups: tuple[ScaleGroup, ...]
    sequential: tuple[tuple[str, ...], ...]
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    conv1d: bool = False  # GPT-2 stores Linear weights transposed (transformers' Conv1D)
    # AWQ does not clip query/key projections: their error is amplified by the softmax (llm-awq auto_clip)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # blocks come in several builds (dense first layers, then MoE ones): a group or stage applies to the blocks
    # that have its Linears, and is skipped in the others (discovered entries only; a table entry is strict)
    per_block: bool = False

    def applies(self, group: ScaleGroup, block: nn.Module) -> bool:
        """Whether ``group`` describes ``block`` (always, for a uniform stack: a missing module is then an error)."""
        if not self.per_block:
            return True
        return all(_has(block, p) for p in (group.prev, *group.linears, *group.passengers))


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = Arch(
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", _QKV, inspect="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), optional=True),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    sequential=(_QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
_GEMMA = Arch(blocks=_LLAMA.blocks, groups=_LLAMA.groups, sequential=_LLAMA.sequential, norm_offset=1.0)
_GEMMA3 = Arch(
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", _QKV, inspect="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), optional=True),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    sequential=_LLAMA.sequential,
    norm_offset=1.0,
)
_PHI3 = Arch(
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), inspect="self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), inspect="mlp"),
    ),
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    no_clip=("self_attn.qkv_proj",),
)
_OPT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPT = Arch(
    blocks="model.decoder.layers",
    groups=(
        ScaleGroup("self_attn_layer_norm", _OPT_QKV, inspect="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), optional=True),
        ScaleGroup("final_layer_norm", ("fc1",)),
        ScaleGroup("fc1", ("fc2",)),  # ReLU between them is positively homogeneous, so scales pass through
    ),
    sequential=(_OPT_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
)
_GPT2 = Arch(
    blocks="transformer.h",
    groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), inspect="attn"),
        ScaleGroup("ln_2", ("mlp.c_fc",), inspect="mlp"),
    ),
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    conv1d=True,
    no_clip=("attn.c_attn",),
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA3,  # post-norms after attention and MLP (outputs, not inputs, of Linears); MLP fed by pre_feedforward
    "gemma3_text": _GEMMA3,
    "phi3": _PHI3,
    "opt": _OPT,
    "gpt2": _GPT2,
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES)) + " (others when their structure can be discovered)"


def arch_for(model_type: str, model: nn.Module | None = None) -> Arch:
    """The table entry for ``model_type``; for a type the table does not name, the entry discovered from ``model``
    itself (models/discover.py: blocks, Linears and which norm feeds which Linears, traced), or one line saying
    what could not be discovered. Never another architecture's layout (the old silent Llama default folded
    Gemma's scales into the wrong places and exited 0); every fold is proven on the block's outputs anyway."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    from lowbit.models.discover import discover

    if model is None:
        raise LowbitError(f"model type {model_type!r} is not in lowbit's architecture table; supported: {supported()}")
    try:
        arch = discover(model, model.config)
    except LowbitError as exc:
        raise LowbitError(
            f"model type {model_type!r} is not in lowbit's architecture table and its structure could not be "
            f"discovered: {exc}; supported: {supported()}"
        ) from None
    log.info("model type %r: structure discovered (blocks %s, %d stages, %d scale groups)",
             model_type, arch.blocks, len(arch.sequential), len(arch.groups))
    return arch


def get_submodule(root: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise LowbitError(
            f"model type {model_type!r}: no module {path!r} where the architecture table expects one; "
            f"supported model types: {supported()} (add an entry to lowbit/models/arch.py for a new one)"
        ) from None


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside a decoder block, by path relative to the block, except routers' (they stay float:
    models/experts.py)."""
    from lowbit.models.experts import in_routers

    routers = in_routers(block)
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and name not in routers}


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_blocks(arch: Arch, blocks: nn.ModuleList, model_type: str) -> None:
    """``check_block`` on block 0, or on every block when they come in several builds."""
    for block in blocks if arch.per_block else blocks[:1]:
        check_block(arch, block, model_type)


def check_block(arch: Arch, block: nn.Module, model_type: str) -> None:
    """Fail loudly when the table does not describe this block: a missing module, or a Linear no stage covers."""
    for group in arch.groups:
        if not arch.applies(group, block):
            continue
        for path in (group.prev, *group.linears, *([group.inspect] if group.inspect else [])):
            get_submodule(block, path, model_type)
    staged = {name for stage in arch.sequential for name in stage}
    if arch.per_block:
        staged = {name for name in staged if _has(block, name)}
    for name in staged:
        get_submodule(block, name, model_type)
    unstaged = sorted(set(block_linears(block)) - staged)
    if unstaged:
        raise LowbitError(
            f"model type {model_type!r}: Linear layers {unstaged} are not in the architecture table's "
            "sequential stages; add them to its entry in lowbit/models/arch.py"
        )
