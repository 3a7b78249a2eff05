"""Submodule outputs kept between the passes over one block, so a pass recomputes only what changed.

True-sequential compression runs the block once per stage (q/k/v, then o, then gate/up, then down for Llama) and
once more to measure it and produce the next block's inputs. Between two passes only the stage just compressed
changed, yet every pass recomputed attention and the MLP from the block's inputs: about 2.7 full block forwards
per batch for Llama, where one pass's work was new. Here each submodule's output from the latest pass is kept
per batch and returned again when it is provably the same:

* its key is (the key of everything computed before it in this forward, its path, the identity of every module
  and tensor in its subtree). The first part starts from the batch number and grows by the key of each submodule
  as it completes, so a key matches only if every module that ran before it, and it itself, are the very objects
  that ran when the entry was stored. Compression swaps modules in (``set_submodule``), never edits one in place
  (the transforms that do, folds, run before the cache exists); the cache holds a reference to every object a key
  names, so an id cannot be reused while the cache lives.
* a module is served from the cache only if no hook is registered on it or below it (observers, recorders, error
  meters must see their module run), and only if the stored output was not modified in place since (the tensors'
  version counters).
* computation is deterministic for the same inputs on the same device, so a served output is bit-identical to the
  one a recomputation would give: results do not depend on whether (or how much) is cached.

Memory: one entry per (batch, submodule that multiplies by a weight matrix: norms and activations are recomputed),
within ``budget_bytes`` (``LOWBIT_PASS_CACHE_MIB``, default 1024; 0
turns caching off); outputs that do not fit are simply recomputed next time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

DEFAULT_BUDGET_MIB = 1024


def budget_from_env() -> int:
    """Bytes the cache may hold: ``LOWBIT_PASS_CACHE_MIB`` (MiB, 0 = off)."""
    raw = os.environ.get("LOWBIT_PASS_CACHE_MIB", str(DEFAULT_BUDGET_MIB))
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if mib < 0:
        raise LowbitError(f"LOWBIT_PASS_CACHE_MIB must be a number of MiB >= 0, got {raw!r}; 0 turns the cache off")
    return int(mib * 2**20)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@dataclass
class _Entry:
    key: tuple
    output: Any
    versions: tuple[int, ...]  # version counters of the output's tensors when stored
    nbytes: int


def _subtree_state(module: nn.Module) -> tuple[tuple, list]:
    """(key part, the objects it names): which module objects and tensors make up ``module`` now."""
    objects: list[Any] = []
    for sub in module.modules():
        objects.append(sub)
        objects.extend(t for t in sub._parameters.values() if t is not None)
        objects.extend(t for t in sub._buffers.values() if t is not None)
    key = tuple(id(o) for o in objects) + tuple(
        (t.data_ptr(), t._version) for t in objects if isinstance(t, torch.Tensor)
    )
    return key, objects


def _multiplies(module: nn.Module) -> bool:
    """Whether ``module`` or a module below it multiplies by a weight matrix (a Linear, a lowbit runtime Linear or
    its calibration stand-in): only such outputs are worth memory; norms and activations are cheap to recompute."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if hasattr(sub, "qweight") or isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return True
    return False


def _hooked(module: nn.Module) -> bool:
    return any(
        sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks for sub in module.modules()
    )


class PassCache:
    """One block's submodule outputs across passes; see the module docstring. Use one per block, after the last
    in-place change to its weights, and drop it when the block is done."""

    def __init__(self, block: nn.Module, budget_bytes: int) -> None:
        self.block = block
        self.budget = budget_bytes
        self.entries: dict[tuple[int, str], _Entry] = {}  # (batch, path) -> the latest entry
        self.bytes = 0
        self.prefix: tuple | None = None
        self.batch = -1
        self.hits = self.misses = 0
        # every object whose id entered a key, alive as long as the cache: an id is never reused while it could match
        self.alive: dict[int, Any] = {}

    @contextmanager
    def forward_of(self, batch: int) -> Iterator[None]:
        """Serve and store submodule outputs during one forward of ``batch`` through the block."""
        if self.budget <= 0 or torch.nn.modules.module._global_forward_hooks:
            yield
            return
        # a module that already has an instance-level forward (another library's wrapper) is left alone
        named = [(p, m) for p, m in self.block.named_modules() if p and "forward" not in m.__dict__]
        for path, module in named:
            self._wrap(path, module)
        self.prefix, self.batch = ("batch", batch), batch
        try:
            yield
        finally:
            for _, module in named:
                del module.forward  # the class's forward again
            self.prefix = None

    def _wrap(self, path: str, module: nn.Module) -> None:
        original = module.forward

        own = tuple(t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
        worth_keeping = _multiplies(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            state, named = _subtree_state(module)
            self.alive.update((id(o), o) for o in (*named, *own))
            key = (self.prefix, path, state)
            slot = (self.batch, path)
            entry = self.entries.get(slot)
            if entry is not None and entry.key == key and not _hooked(module):
                if tuple(t._version for t in _tensors(entry.output)) == entry.versions:
                    self.hits += 1
                    self.prefix = key
                    return entry.output
            self.misses += 1
            if own:  # a container's own weights (a router, a scale) may shape what its children are given
                self.prefix = (self.prefix, path, tuple((id(t), t.data_ptr(), t._version) for t in own))
            output = original(*args, **kwargs)
            self.prefix = key  # what ran inside is summed up by this module's own key
            if worth_keeping:
                self._store(slot, _Entry(key, output, (), 0))
            return output

        module.forward = forward  # an instance attribute: nn.Module.__call__ still runs the module's hooks

    def _store(self, slot: tuple[int, str], entry: _Entry) -> None:
        old = self.entries.pop(slot, None)
        if old is not None:
            self.bytes -= old.nbytes
        tensors = _tensors(entry.output)
        # what the entry keeps alive: whole storages (an output may be a view of a larger tensor), each once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        nbytes = sum(storages.values())
        if self.bytes + nbytes > self.budget:
            return
        entry.versions = tuple(t._version for t in tensors)
        entry.nbytes = nbytes
        self.entries[slot] = entry
        self.bytes += nbytes
