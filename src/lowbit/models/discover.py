"""Discover the architecture entry of a model type the table does not name: blocks, Linears, and which op feeds
which Linears, found from the model itself (DESIGN principle 3).

A twin of the model's skeleton (parameters and buffers on the meta device: nothing is allocated or computed) runs one
forward on a few meta token ids with hooks on block 0's modules. Every Linear's input and every module's output are recorded as tensor objects:
Linears called on the same object share an input (q/k/v; gate/up), their first use orders the true-sequential
stages, and the module that returned that object is the op feeding them. A norm feeding Linears becomes a scale
group for SmoothQuant and AWQ; whether its fold is exact is not assumed from names but proven on every run
(pipeline/fold.py), so a wrong guess costs the group its smoothing, never the model its correctness. A norm's
offset (Gemma's (1 + w)) is measured on a copy of the norm, not looked up.

Mixture-of-experts layers arrive with their experts split into Linears (models/experts.py) and traced with every
expert on every token: all experts' gate/up projections share the layer's input and so one stage and one scale
group, whose routers ride along as passengers (scaled, never quantized); the experts' down projections form one
stage.

A stack whose blocks come in a few builds (DeepSeek's dense first layers before MoE ones, alternating attention
kinds) is traced once per build; the entry then serves each block with the groups and stages whose Linears it has
(``Arch.per_block``).

Refused in one line: no list of decoder blocks, more than ``MAX_BLOCK_KINDS`` builds of block, weights held
outside Linears and norms (state-space layers, convolutions, experts of a layout that cannot be split), or a
forward that cannot be traced.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import LowbitError
from lowbit.models.experts import RoutedExperts, all_tokens_to_all_experts, in_routers, is_router, unfuse_experts

if TYPE_CHECKING:
    from lowbit.models.arch import Arch

log = logging.getLogger(__name__)
_TRACE_TOKENS = 8
_NO_CLIP_SUFFIXES = ("q_proj", "k_proj", "qkv_proj", "query", "key", "query_key_value", "c_attn", "Wqkv", "qkv")


def is_linear(module: nn.Module) -> bool:
    """A Linear, a GPT-2 Conv1D, or lowbit's runtime module in a Linear's place (a quantized model being saved)."""
    from lowbit.runtime.registry import is_runtime_module

    return isinstance(module, (nn.Linear, Conv1D)) or is_runtime_module(module)


def quantizable_linears(block: nn.Module) -> set[str]:
    """Paths of the block's Linears (or runtime modules in their place) outside routers."""
    routers = in_routers(block)
    return {name for name, m in block.named_modules() if is_linear(m) and name not in routers}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def find_blocks(model: nn.Module, n_layers: int | None) -> str:
    """Path of the decoder blocks: the ModuleList of ``num_hidden_layers`` entries that hold Linears."""
    candidates = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)
        and any(is_linear(x) for x in m[0].modules())
    ]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(candidates)
        raise LowbitError(f"cannot tell which module list holds the decoder blocks (candidates: {found})")
    return candidates[0]


def _signature(block: nn.Module) -> list[tuple[str, str]]:
    """Module paths and kinds; a Linear and the runtime module replacing it are the same kind (a saved model whose
    ignore patterns left some layers float is still one build of block)."""
    return [(name, "Linear" if is_linear(m) else type(m).__name__) for name, m in block.named_modules()]


def check_weights_are_in_linears_and_norms(block: nn.Module) -> None:
    """Matrices anywhere but in Linears (3-D expert tensors left fused, convolution weights) would stay float
    silently or be mishandled: refuse. Vectors and scalars elsewhere (a learnable activation's alphas, a gate's
    bias, a state-space layer's decay) stay in float, as norms do, and so do mixture-of-experts routers (marked by
    models/experts.py, which split the experts into Linears)."""
    routers = in_routers(block)
    for name, module in block.named_modules():
        if is_linear(module) or is_norm(module) or name in routers:
            continue
        matrices = [p for p, t in module.named_parameters(recurse=False) if t.dim() >= 2]
        if matrices:
            where = f"{name} {type(module).__name__}".lower()
            kind = "mixture-of-experts tensors" if "expert" in where or "router" in where else type(module).__name__
            raise LowbitError(
                f"block module {name!r} ({kind}) holds weight matrices outside Linear layers ({', '.join(matrices)}), "
                "which lowbit cannot quantize yet"
            )


@dataclass
class Trace:
    """What one forward through block 0 showed."""

    linear_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear path -> its input object
    outputs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # (path, out, in)


def meta_twin(config: object) -> nn.Module:
    """A second skeleton of the same config with parameters *and* buffers on the meta device, to trace: nothing is
    computed or allocated, and no computed buffer (rotary tables) sits on another device than the activations."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=True):
            twin = AutoModelForCausalLM.from_config(config, trust_remote_code=False, attn_implementation="eager").eval()
    except Exception as exc:  # the skeleton was built once already; a failure here means it cannot be traced
        raise LowbitError(f"no second skeleton to trace ({type(exc).__name__}: {str(exc)[:100]})") from None
    unfuse_experts(twin)  # as the model itself was
    return twin


def trace_block(model: nn.Module, block: nn.Module) -> Trace:
    """One forward of ``model`` (a ``meta_twin``) on meta token ids, hooks on ``block``'s modules. The tensors are
    kept in the trace, so identity comparisons cannot be fooled by a freed object's reused id."""
    trace = Trace()

    def record(path: str, module: nn.Module, args: tuple, output: object) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = output[0] if isinstance(output, tuple) and output else output
        if is_linear(module) and first is not None and path not in trace.linear_inputs:
            trace.linear_inputs[path] = first
        if isinstance(out, torch.Tensor):
            trace.outputs.append((path, out, first))

    handles = [
        m.register_forward_hook(lambda mod, args, out, path=path: record(path, mod, args, out))
        for path, m in block.named_modules() if path
    ]
    ids = torch.zeros(1, _TRACE_TOKENS, dtype=torch.long, device="meta")
    # without a mask some models look for padding in the ids, with one others inspect the mask: both read values
    # (.item()), which meta tensors do not have; one of the two usually traces
    attempts = ({}, {"attention_mask": torch.ones_like(ids)})
    failure = ""
    try:
        for extra in attempts:
            trace.linear_inputs.clear()
            trace.outputs.clear()
            try:
                # every expert on every token: the routed path selects tokens by value, which meta tensors lack
                with torch.no_grad(), all_tokens_to_all_experts(model):
                    model(input_ids=ids, **extra)
                return trace
            except Exception as exc:  # any failure of a foreign forward on meta tensors means the same: no trace
                failure = f"{type(exc).__name__}: {str(exc)[:100]}"
    finally:
        for handle in handles:
            handle.remove()
    raise LowbitError(f"its forward cannot be traced on the meta device ({failure})")


def _producer(trace: Trace, tensor: torch.Tensor) -> str | None:
    """The module that created ``tensor`` (not one that passed it through, like dropout in eval mode), or the
    tensor it is a view of (a MoE layer flattens its input [B, L, H] -> [B*L, H] before routing it)."""
    for candidate in (tensor, tensor._base):
        for path, out, inp in trace.outputs:
            if candidate is not None and out is candidate and inp is not candidate:
                return path
    return None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are one tensor, or one is a view of the other (a MoE layer's flattened input)."""
    return a is b or a._base is b or b._base is a or (a._base is not None and a._base is b._base)


def merge_groups_by_producer(groups: list) -> tuple:
    """One scale group per op: a norm whose output reaches Linears as several objects (a MoE layer hands its
    shared expert the [B, L, H] output and its routed experts a [B*L, H] view) scales all of them with one s, or
    the second fold would rescale the first group's input. AWQ then inspects their common parent."""
    from lowbit.models.arch import ScaleGroup

    merged: dict[str, tuple[list[str], list[str]]] = {}
    for g in groups:
        linears, passengers = merged.setdefault(g.prev, ([], []))
        linears.extend(g.linears)
        passengers.extend(p for p in g.passengers if p not in passengers)
    return tuple(
        ScaleGroup(prev, tuple(linears), inspect=_common_parent(linears) if len(linears) > 1 else None,
                   passengers=tuple(passengers))
        for prev, (linears, passengers) in merged.items()
    )


def _expert_stage_key(stage: list[str], experts: list[str]) -> str | None:
    """"mlp.experts.*.down_proj" for a stage of one routed expert's Linear, None for any other stage."""
    if len(stage) != 1:
        return None
    for path in experts:
        head = path + "."
        if stage[0].startswith(head):
            _, _, rest = stage[0][len(head):].partition(".")
            return f"{head}*.{rest}"
    return None


def merge_expert_stages(stages: list[list[str]], experts: list[str]) -> list[list[str]]:
    """One stage for the same Linear of every routed expert (each expert's down_proj has its own input, so tracing
    gives one stage per expert): no expert's input depends on another's, and GPTQ's true-sequential passes then
    cost one block forward for all of them, not one per expert."""
    merged: list[list[str]] = []
    at: dict[str, list[str]] = {}
    for stage in stages:
        key = _expert_stage_key(stage, experts)
        if key is not None and key in at:
            at[key].extend(stage)
            continue
        merged.append(list(stage))
        if key is not None:
            at[key] = merged[-1]
    return merged


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def norm_offset(norm: nn.Module, width: int) -> float | None:
    """c in y = x_hat * (c + w), measured on a CPU copy of the norm with w = 0 and w = 1; None if it is neither
    0 nor 1 (or the norm has no weight): such a norm is not folded into."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != width:
        return None
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        probe.weight.zero_()
        y0 = probe(x)
        probe.weight.fill_(1.0)
        y1 = probe(x)
    for offset in (0.0, 1.0):
        if torch.allclose(y0, offset * (y1 - y0), atol=1e-5, rtol=1e-4):
            return offset
    return None


@dataclass
class KindEntry:
    """What tracing one kind of block found (paths relative to the block)."""

    stages: list[list[str]]
    groups: list  # ScaleGroup
    offsets: list[float]
    linears: set[str]


def discover_kind(model: nn.Module, twin: nn.Module, blocks_path: str, index: int) -> KindEntry:
    """Stages and scale groups of block ``index`` (of ``model``), traced on the same block of the meta ``twin``."""
    from lowbit.models.arch import ScaleGroup  # arch imports this module lazily: no cycle at import time

    block = model.get_submodule(blocks_path)[index]
    check_weights_are_in_linears_and_norms(block)
    twin_block = twin.get_submodule(blocks_path)[index]
    trace = trace_block(twin, twin_block)
    linears = quantizable_linears(block)  # routers' Linears stay float: neither staged nor quantized
    if linears != quantizable_linears(twin_block):
        raise LowbitError("its blocks do not have the Linears its config builds")
    untraced = sorted(linears - set(trace.linear_inputs))
    if untraced:
        raise LowbitError(f"its Linears {untraced} were not called in a forward pass, so their inputs are unknown")

    # Linears sharing one input object, in order of first use: the true-sequential stages
    stages: list[list[str]] = []
    for path, inp in trace.linear_inputs.items():
        if path not in linears:
            continue
        stage = next((s for s in stages if trace.linear_inputs[s[0]] is inp), None)
        if stage is None:
            stages.append([path])
        else:
            stage.append(path)
    experts = [path for path, m in block.named_modules() if isinstance(m, RoutedExperts)]
    stages = merge_expert_stages(stages, experts)
    router_inputs = {path: inp for path, _, inp in trace.outputs if is_router(twin_block.get_submodule(path))}

    # a norm feeding a stage is a scale group; one whose fold cannot be exact (a norm without a weight, an offset
    # other than the entry's) stays in, so the run reports it as refused and why
    groups, offsets = [], []
    for stage in stages:
        producer = _producer(trace, trace.linear_inputs[stage[0]])
        if producer is None or not is_norm(twin_block.get_submodule(producer)):
            continue
        offset = norm_offset(twin_block.get_submodule(producer), trace.linear_inputs[stage[0]].shape[-1])
        if offset is not None:
            offsets.append(offset)
        passengers = tuple(p for p, inp in router_inputs.items() if same_values(inp, trace.linear_inputs[stage[0]]))
        groups.append(ScaleGroup(producer, tuple(stage), passengers=passengers))
    return KindEntry(stages, list(merge_groups_by_producer(groups)), offsets, linears)


def block_kinds(blocks: nn.ModuleList) -> list[int]:
    """Index of the first block of each distinct build, in order (one entry for a uniform stack)."""
    seen: dict[tuple, int] = {}
    for i, block in enumerate(blocks):
        seen.setdefault(tuple(_signature(block)), i)
    return list(seen.values())


MAX_BLOCK_KINDS = 4  # a dense-then-MoE stack has 2; more means a hybrid this tracing was not written for


def combine_kinds(entries: list[KindEntry]) -> tuple[list[list[str]], list]:
    """One list of stages and groups serving every kind of block: a stage or group applies to a block that has its
    Linears (arch.per_block). A Linear path staged differently by two kinds cannot be served by one list: refused."""
    stages: list[list[str]] = []
    staged: set[str] = set()
    groups: list = []
    for entry in entries:
        for stage in entry.stages:
            if stage in stages:
                continue
            if staged & set(stage):
                raise LowbitError(f"its kinds of decoder block use Linears {sorted(staged & set(stage))} differently")
            stages.append(stage)
            staged |= set(stage)
        groups.extend(g for g in entry.groups if g not in groups)
    return stages, groups


def discover(model: nn.Module, config: object) -> Arch:
    """The architecture entry of ``model``, or a LowbitError saying what could not be discovered. A stack whose
    blocks come in a few kinds (DeepSeek's dense first layers before MoE ones) is traced once per kind."""
    from lowbit.models.arch import Arch  # arch imports this module lazily: no cycle at import time

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks_path = find_blocks(model, getattr(text_config, "num_hidden_layers", None))
    blocks = model.get_submodule(blocks_path)
    kinds = block_kinds(blocks)  # type: ignore[arg-type]
    if len(kinds) > MAX_BLOCK_KINDS:
        raise LowbitError(f"its decoder blocks come in {len(kinds)} different builds (at most {MAX_BLOCK_KINDS} are traced)")
    twin = meta_twin(config)
    entries = [discover_kind(model, twin, blocks_path, i) for i in kinds]
    stages, groups = combine_kinds(entries)
    offsets = [o for e in entries for o in e.offsets]
    linears = set().union(*(e.linears for e in entries))
    return Arch(
        blocks=blocks_path,
        groups=tuple(groups),
        sequential=tuple(tuple(s) for s in stages),
        norm_offset=max(set(offsets), key=offsets.count) if offsets else 0.0,  # one per entry: the majority's
        conv1d=any(isinstance(m, Conv1D) for m in blocks.modules()),
        no_clip=tuple(sorted(p for p in linears if p.rsplit(".", 1)[-1] in _NO_CLIP_SUFFIXES)),
        per_block=len(kinds) > 1,
    )
