"""Mixture-of-experts layers as Linears.

transformers 5 stores a MoE layer's experts as 3-D tensors (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
some transposed, some with gate and up interleaved, some with biases) inside one module whose forward loops over
the experts the router picked. ``RoutedExperts`` holds the same weights as one ``nn.Linear`` per expert and
projection (``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, the per-expert names the checkpoints on the
hub use), so GPTQ, AWQ, RTN and SmoothQuant, the per-Linear report, the packed runtime and the exports handle
experts as they handle any Linear. The translation of each experts class is proven, not assumed
(``check_unfolding``): its own forward and ``RoutedExperts``' agree on random weights, tokens and routes, or the
model is refused in one line.

Routers (the ``[E, H]`` matrices choosing the experts, and a shared expert's ``[1, H]`` gate) stay in float, as
llm-compressor and GPTQModel keep them: a quantized router changes which experts run, an error no per-Linear
metric sees. They read the same normalized input as the experts, so a SmoothQuant/AWQ fold scales their columns
too (``router_paths``).

Calibration: the router sends a calibration set's tokens to few experts, some none at all. While statistics are
collected (``all_tokens``), every expert computes on every token, so each gets a Hessian and activation ranges from
the whole calibration set (llm-compressor's ``calibrate_all_experts``); the layer's output still sums only the
routed experts' contributions, so the next block sees the model's true activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.errors import LowbitError

_LAYOUT = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
UNFOLD_TOLERANCE = 1e-5  # float32, relative to the output's largest value: summation order only


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' 3-D expert container (classes decorated with ``use_experts_implementation``)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3 and all(hasattr(module, a) for a in ("num_experts", *_LAYOUT))


class Expert(nn.Module):
    """One expert's projections as Linears (``gate_proj`` only for gated experts)."""

    def __init__(self, hidden: int, intermediate: int, gated: bool, bias: bool, device, dtype) -> None:
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, device=device, dtype=dtype)


class RoutedExperts(nn.Module):
    """The experts of one MoE layer, called like transformers' fused module: (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]. Children ``"0"`` .. ``"E-1"`` are ``Expert`` modules."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.num_experts: int = fused.num_experts
        for attr in _LAYOUT:
            setattr(self, attr, bool(getattr(fused, attr)))
        self.all_tokens = False  # set while calibrating (see the module docstring)
        up = fused.gate_up_proj if self.has_gate else fused.up_proj  # [E, out, in], or [E, in, out] transposed
        hidden = up.shape[1] if self.is_transposed else up.shape[2]
        intermediate = fused.down_proj.shape[1] if self.is_transposed else fused.down_proj.shape[2]
        # what the class's own gate function reads (act_fn, gpt-oss' alpha and limit), never its weights
        self._apply_gate_fn: Callable = type(fused)._apply_gate
        for name, value in vars(fused).items():
            if not name.startswith("_") and isinstance(value, (int, float, bool, str)) and not hasattr(self, name):
                setattr(self, name, value)
        self.act_fn = fused.act_fn if isinstance(getattr(fused, "act_fn", None), nn.Module) else None
        if self.has_post_expert_norm:
            self.post_expert_norm = fused.post_expert_norm
        for e in range(self.num_experts):
            self.add_module(str(e), Expert(hidden, intermediate, self.has_gate, self.has_bias, up.device, up.dtype))
        if up.device.type != "meta":
            self._copy_weights(fused)

    def expert(self, e: int) -> Expert:
        return self._modules[str(e)]  # type: ignore[return-value]

    def _part(self, tensor: torch.Tensor) -> torch.Tensor:
        """[out, in] of one expert's slice of a fused weight ([in, out] when transposed)."""
        return tensor.t() if self.is_transposed else tensor

    def split_gate_up(self, gate_up: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) halves of a fused gate_up tensor along ``dim``: concatenated [gate; up] or interleaved."""
        if self.is_concatenated:
            return gate_up.chunk(2, dim=dim)
        index = torch.arange(gate_up.shape[dim], device=gate_up.device)
        return gate_up.index_select(dim, index[0::2]), gate_up.index_select(dim, index[1::2])

    @torch.no_grad()
    def _copy_weights(self, fused: nn.Module) -> None:
        for e in range(self.num_experts):
            ex = self.expert(e)
            if self.has_gate:
                gate, up = self.split_gate_up(self._part(fused.gate_up_proj[e]), dim=0)
                ex.gate_proj.weight.copy_(gate)
                ex.up_proj.weight.copy_(up)
                if self.has_bias:
                    gate_b, up_b = self.split_gate_up(fused.gate_up_proj_bias[e], dim=0)
                    ex.gate_proj.bias.copy_(gate_b)
                    ex.up_proj.bias.copy_(up_b)
            else:
                ex.up_proj.weight.copy_(self._part(fused.up_proj[e]))
                if self.has_bias:
                    ex.up_proj.bias.copy_(fused.up_proj_bias[e])
            ex.down_proj.weight.copy_(self._part(fused.down_proj[e]))
            if self.has_bias:
                ex.down_proj.bias.copy_(fused.down_proj_bias[e])

    def _expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, H] through expert ``e``, with the class's own gate function."""
        ex = self.expert(e)
        if self.has_gate:
            gate, up = ex.gate_proj(x), ex.up_proj(x)
            if self.is_concatenated:
                gate_up = torch.cat([gate, up], dim=-1)
            else:  # interleaved [g0, u0, g1, u1, ...]
                gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
            h = self._apply_gate_fn(self, gate_up)
        else:
            h = self.act_fn(ex.up_proj(x))
        out = ex.down_proj(h)
        return self.post_expert_norm(out) if self.has_post_expert_norm else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # [T, H]
        if self.all_tokens:
            # every expert on every token (no data-dependent shapes: this path also traces on the meta device);
            # a token's output sums only its routed experts, weighted as the router chose
            for e in range(self.num_experts):
                weight = (top_k_weights * (top_k_index == e)).sum(dim=-1, keepdim=True)  # [T, 1]
                y = self._expert_forward(e, hidden_states) * weight
                # a token not routed here contributes exactly 0, even where the expert overflows on it (inf * 0)
                out = out + torch.where(weight != 0, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(out.dtype)
            return out
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)  # the tokens routed to e, and which of their k picks it is
            if token.numel() == 0:
                continue
            y = self._expert_forward(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def router_paths(moe: nn.Module, experts_name: str, num_experts: int, hidden: int) -> list[str]:
    """Children of a MoE layer ``moe`` (beside its experts) that route: a module whose one matrix reading the
    ``hidden`` channels is [E, H] (the router) or [1, H] (a shared expert's gate); it may hold small statistics
    besides (ERNIE's score-correction bias). Paths relative to ``moe``."""
    found = []
    for name, child in moe.named_children():
        if name == experts_name:
            continue
        readers = [p for p in child.parameters() if p.dim() == 2 and p.shape[1] == hidden]
        if len(readers) == 1 and readers[0].shape[0] in (num_experts, 1):
            found.append(name)
    return found


def unfuse_experts(root: nn.Module) -> list[str]:
    """Replace every fused experts module under ``root`` by a ``RoutedExperts`` (meta stays meta) and mark its
    layer's routers (``is_router``); returns the experts' paths. Each experts class is proven once
    (``check_unfolding``) before its first replacement."""
    replaced = []
    for name, module in list(root.named_modules()):
        if is_fused_experts(module):
            check_unfolding(type(module), module)
            root.set_submodule(name, RoutedExperts(module))
            replaced.append(name)
    for name, experts in routed_experts(root):
        parent_path, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        hidden = experts.expert(0).up_proj.in_features
        for path in router_paths(parent, leaf, experts.num_experts, hidden):
            parent.get_submodule(path).lowbit_router = True
    return replaced


def is_router(module: nn.Module) -> bool:
    return getattr(module, "lowbit_router", False) is True


def in_routers(block: nn.Module) -> set[str]:
    """Paths of the routers under ``block`` and of every module inside them (a router may hold a Linear, like
    Hunyuan's ``gate.wg``): the modules that stay float and are never staged."""
    routers = [name for name, m in block.named_modules() if is_router(m)]
    return {name for name, _ in block.named_modules() if any(name == r or name.startswith(r + ".") for r in routers)}


def router_matrix(module: nn.Module) -> torch.Tensor:
    """A router's weight matrix [E, H] (or [1, H]): its columns take a fold's scales like a Linear's. The largest
    2-D parameter: a router's statistics beside it ([1, E]) are smaller."""
    return max((p for p in module.parameters() if p.dim() == 2), key=lambda p: p.numel())


def routed_experts(root: nn.Module) -> Iterator[tuple[str, RoutedExperts]]:
    for name, module in root.named_modules():
        if isinstance(module, RoutedExperts):
            yield name, module


@contextmanager
def all_tokens_to_all_experts(root: nn.Module) -> Iterator[None]:
    """Inside the context every expert under ``root`` computes on every token (calibration; tracing)."""
    modules = [m for _, m in routed_experts(root)]
    for m in modules:
        m.all_tokens = True
    try:
        yield
    finally:
        for m in modules:
            m.all_tokens = False


def _probe_copy(fused: nn.Module, n_experts: int, hidden: int, intermediate: int) -> nn.Module:
    """A small CPU copy of a fused experts module with random float32 weights: ``n_experts`` experts, the given
    widths, the class's own layout flags and gate function, its own (eager) forward."""
    probe = copy.copy(fused)  # shallow: shares nothing that is written below
    probe._parameters = {}
    probe._modules = dict(fused._modules)
    probe.num_experts = n_experts
    config = getattr(fused, "config", None)
    if config is not None:
        probe.config = copy.copy(config)
        probe.config._experts_implementation = "eager"  # the class's own loop, not a kernel's
    generator = torch.Generator().manual_seed(0)

    def weight(out: int, inp: int) -> nn.Parameter:
        shape = (n_experts, inp, out) if fused.is_transposed else (n_experts, out, inp)
        return nn.Parameter(torch.randn(shape, generator=generator) / inp**0.5, requires_grad=False)

    if fused.has_gate:
        probe.gate_up_proj = weight(2 * intermediate, hidden)
    else:
        probe.up_proj = weight(intermediate, hidden)
    probe.down_proj = weight(hidden, intermediate)
    if fused.has_bias:
        up_name = "gate_up_proj_bias" if fused.has_gate else "up_proj_bias"
        up_width = 2 * intermediate if fused.has_gate else intermediate
        setattr(probe, up_name, nn.Parameter(torch.randn(n_experts, up_width, generator=generator) * 0.1))
        probe.down_proj_bias = nn.Parameter(torch.randn(n_experts, hidden, generator=generator) * 0.1)
    for name, child in probe._modules.items():  # act_fn, a post-expert norm: own CPU copies, never the model's
        if child is None:
            continue
        child = copy.deepcopy(child)
        if any(t.device.type == "meta" for t in (*child.parameters(), *child.buffers())):
            child = child.to_empty(device="cpu")
            for p in child.parameters():
                nn.init.normal_(p, 1.0, 0.1)
        child = child.to("cpu")  # the probe runs on the CPU whatever device the model is on
        probe._modules[name] = child
    return probe.float()


_CHECKED: dict[type, str] = {}  # experts class -> why it cannot be split ("" when proven)


@torch.no_grad()
def check_unfolding(cls: type, fused: nn.Module) -> None:
    """Prove, once per experts class, that ``RoutedExperts`` computes what the class's own forward computes: both
    on a small random copy (4 experts, hidden 16, intermediate 8, 12 tokens routed top-2 with random weights, float32)
    must agree within ``UNFOLD_TOLERANCE`` of the output's scale, on the routed path and the all-tokens path.
    Otherwise the model is refused (a layout this module does not know, a forward that does more than the loop)."""
    if cls not in _CHECKED:
        _CHECKED[cls] = _unfolding_failure(fused)
    if _CHECKED[cls]:
        raise LowbitError(f"its mixture-of-experts layer {cls.__name__} cannot be split into Linears ({_CHECKED[cls]})")


def _unfolding_failure(fused: nn.Module) -> str:
    n_experts, hidden, intermediate, tokens, k = 4, 16, 8, 12, 2
    try:
        probe = _probe_copy(fused, n_experts, hidden, intermediate)
        unfolded = RoutedExperts(probe)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, hidden, generator=generator)
        index = torch.stack([torch.randperm(n_experts, generator=generator)[:k] for _ in range(tokens)])
        index[0] = torch.tensor([0, 1])  # expert 3 may go unrouted, and 0, 1 always run
        weights = torch.rand(tokens, k, generator=generator)
        expected = probe(x, index, weights)
        scale = expected.abs().max().item()
        for all_tokens in (False, True):
            unfolded.all_tokens = all_tokens
            change = (unfolded(x, index, weights) - expected).abs().max().item()
            if not change <= UNFOLD_TOLERANCE * max(scale, 1e-30):
                return f"its per-expert Linears change the layer's output by {change / scale:.1e} of its scale"
    except Exception as exc:  # a foreign forward on an unexpected layout: any failure means the same
        return f"{type(exc).__name__}: {str(exc)[:100]}"
    return ""
