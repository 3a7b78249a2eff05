"""Where each tensor of lowbit's model is stored in a Hugging Face checkpoint.

Most checkpoints name tensors as the model does. Mixture-of-experts checkpoints do not: the hub stores every expert's
projections as 2-D tensors (Mixtral ``block_sparse_moe.experts.3.w1.weight``, Qwen-MoE ``mlp.experts.3.gate_proj
.weight``), which transformers 5 renames and stacks into 3-D parameters while loading. lowbit keeps experts as
per-expert Linears (models/experts.py), so it reads those 2-D tensors directly, under names derived from the same
conversion rules transformers uses for the model type (``get_checkpoint_conversion_mapping``): renamings applied as
written, and per-expert sources of a merge mapped to ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``. A
checkpoint that already stores an expert stack (GraniteMoE's ``input_linear``) is read as slices of it. A rule with
operations other than merge-and-concatenate is not followed: its tensors then show up as missing in the strict
check, one line, never a silent misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.models.experts import RoutedExperts

_PLAIN_OPS = {"MergeModulelist", "Concatenate"}
# a merge rule's stacked target -> the per-expert Linears its sources are, in the order of the rule's sources
_ROLES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's part of a stacked [E, ...] checkpoint tensor ``key``: ``part`` is "gate", "up" (halves of a
    gate_up stack) or "all"; ``experts`` describes the stack's layout."""

    key: str
    expert: int
    part: str
    experts: RoutedExperts

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        one = stacked[self.expert]
        if one.dim() == 2 and self.experts.is_transposed:
            one = one.t()
        if self.part != "all":
            gate, up = self.experts.split_gate_up(one, dim=0)
            one = gate if self.part == "gate" else up
        return one.contiguous()

    def shape(self, stacked_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.take(torch.empty(stacked_shape, device="meta")).shape)


Location = str | ExpertSlice


def _rules(model_type: str) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion rules loads checkpoints as named
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _renamed(key: str, rules: list) -> str:
    for rule in rules:
        if type(rule).__name__ == "WeightRenaming":
            for source, target in zip(rule.source_patterns, rule.target_patterns):
                key = re.sub(source, target, key)
    return key


def _expert_name(key: str, rules: list) -> str | None:
    """The per-expert Linear name a merge rule's source ``key`` becomes, or None when no plain merge rule takes it."""
    for rule in rules:
        if type(rule).__name__ != "WeightConverter" or len(rule.target_patterns) != 1:
            continue
        if not {type(op).__name__ for op in rule.operations} <= _PLAIN_OPS:
            continue
        target = rule.target_patterns[0]
        stack, _, fused = target.rpartition(".")
        if fused not in _ROLES or len(rule.source_patterns) != len(_ROLES[fused]):
            continue
        for source, role in zip(rule.source_patterns, _ROLES[fused]):
            suffix = source.rpartition(".")[2]  # "weight" or "bias"
            match = re.search(source.replace(".", r"\.").replace("*", r"(\d+)") + "$", key)
            if match:
                return f"{key[: match.start()]}{stack}.{match.group(1)}.{role}.{suffix}"
    return None


def checkpoint_locations(
    model_type: str, keys: list[str], experts: dict[str, RoutedExperts], prefix: str
) -> dict[str, Location]:
    """Model tensor name -> where the checkpoint holds it, for every checkpoint key the conversion rules of
    ``model_type`` rename or split (keys stored under the model's own names need no entry). ``experts`` are the
    model's RoutedExperts by path; ``prefix`` the base-model prefix some checkpoints omit."""
    rules = _rules(model_type)  # none for a type whose checkpoints use the model's names (stacks are still sliced)
    located: dict[str, Location] = {}
    for key in keys:
        name = _renamed(key, rules)
        name = _expert_name(name, rules) or name
        stack_path, _, leaf = name.rpartition(".")
        owner = experts.get(stack_path) or experts.get(prefix + stack_path)
        if owner is not None and leaf in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                                          "down_proj_bias"):
            path = stack_path if stack_path in experts else prefix + stack_path
            role, _, bias = leaf.partition("_proj")
            suffix = "bias" if bias else "weight"
            parts = {"gate_up": (("gate_proj", "gate"), ("up_proj", "up")), "up": (("up_proj", "all"),),
                     "down": (("down_proj", "all"),)}[role]
            for e in range(owner.num_experts):
                for linear, part in parts:
                    located[f"{path}.{e}.{linear}.{suffix}"] = ExpertSlice(key, e, part, owner)
        elif name != key:
            located[name] = key
    return located


def hub_tensor_name(model_type: str, name: str) -> str:
    """The name the hub's checkpoints give tensor ``name`` of lowbit's model (the rules above inverted), for exports
    that other tools read by hub names: vLLM reads Mixtral's experts as ``block_sparse_moe.experts.3.w1.*``.
    Quantized tensors (``weight_packed``, ``weight_scale``) follow their module. Renamings are inverted only where
    both sides are literal names."""
    rules = _rules(model_type)
    module, _, tensor = name.rpartition(".")
    for rule in rules:
        if type(rule).__name__ != "WeightConverter" or len(rule.target_patterns) != 1:
            continue
        stack, _, fused = rule.target_patterns[0].rpartition(".")
        if fused not in _ROLES or len(rule.source_patterns) != len(_ROLES[fused]):
            continue
        for source, role in zip(rule.source_patterns, _ROLES[fused]):
            match = re.search(stack.replace(".", r"\.") + rf"\.(\d+)\.{role}$", module)
            if match:  # ".experts.*.w1.weight" -> ".experts.3.w1"
                module = module[: match.start()] + source.rpartition(".")[0].replace("*", match.group(1))
                break
    name = f"{module}.{tensor}"
    for rule in reversed(rules):
        if type(rule).__name__ == "WeightRenaming":
            for source, target in zip(rule.source_patterns, rule.target_patterns):
                literal = source.replace("\\.", ".")
                if re.fullmatch(r"[\w.]+", literal) and re.fullmatch(r"[\w.]+", target):
                    name = name.replace(target, literal)
    return name


def hub_module_name(model_type: str, module: str) -> str:
    return hub_tensor_name(model_type, module + ".weight").rpartition(".")[0]
