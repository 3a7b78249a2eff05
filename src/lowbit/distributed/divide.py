"""Per-Linear work that does not shrink with more tokens (GPTQ's Cholesky and column loop, AWQ's clip search),
divided among ranks: each rank computes the items it owns, then every result is broadcast from its owner, so all
ranks continue with the same results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from lowbit.distributed.ranks import Ranks

T = TypeVar("T")


def owners(costs: Sequence[float], size: int) -> list[int]:
    """The rank that computes each item: longest items first, each to the least loaded rank (ties: lowest rank),
    the same on every rank since it depends only on ``costs``."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def divide_work(
    ranks: Ranks, items: Sequence[str], cost: Callable[[str], float], work: Callable[[str], T]
) -> dict[str, T]:
    """``work(item)`` for every item, each computed on one rank and known to all. One process: computed in order.

    All owned items are computed before any broadcast: broadcasting item by item would make every rank wait for
    each owner in turn, and the work would run one rank at a time."""
    if not ranks.distributed:
        return {item: work(item) for item in items}
    owner = owners([cost(item) for item in items], ranks.size)
    mine = {item: work(item) for item, r in zip(items, owner) if r == ranks.rank}
    return {item: ranks.broadcast(mine.get(item), src=r) for item, r in zip(items, owner)}
