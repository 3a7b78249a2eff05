"""Streaming accumulators over a module's inputs x [..., in], fed one calibration batch at a time.

Only the AWQ replay keeps raw activations (a bounded number of calls); everything else is a running statistic.
On several ranks each observer sees its rank's batches, and ``reduce`` turns the local statistics into the ones
of all batches (taps.run_with_taps calls it once, after the pass, on every rank in the same order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lowbit.distributed.ranks import Ranks


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]


class HessianObserver:
    """H = 2 X^T X / n_tokens, as a running average (IST-DASLab/gptq GPTQ.add_batch).

    ``skip_first`` leaves the first positions of every sequence (x [batch, seq, in]) out.
    """

    def __init__(self, skip_first: int = 0) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0
        self.skip_first = skip_first

    def add_batch(self, x: torch.Tensor) -> None:
        if self.skip_first and x.dim() == 3:
            x = x[:, self.skip_first :]
        rows = _rows(x)
        t = rows.shape[0]
        if self.H is None:
            self.H = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
        self.H *= self.n / (self.n + t)
        self.n += t
        self.H.addmm_(rows.T, rows, alpha=2.0 / self.n)  # in place: no scaled copy of the [tokens, in] rows

    def reduce(self, ranks: Ranks) -> None:
        """H = sum over ranks of n_r H_r, divided by the total token count."""
        assert self.H is not None, "every rank runs at least one batch (checked before the loop)"
        self.H *= self.n
        ranks.sum_(self.H)
        self.n = int(ranks.sum_floats([float(self.n)])[0])
        self.H /= self.n


class InputNormObserver:
    """||X_j||_2 over all tokens, per input feature (Wanda's activation term)."""

    def __init__(self) -> None:
        self.sumsq: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        sq = _rows(x).pow(2).sum(dim=0)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq

    def reduce(self, ranks: Ranks) -> None:
        assert self.sumsq is not None
        ranks.sum_(self.sumsq)

    @property
    def norm(self) -> torch.Tensor:
        assert self.sumsq is not None
        return self.sumsq.sqrt()


class AbsMaxObserver:
    """max |X_j| per input feature (SmoothQuant, static activation scales)."""

    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        m = _rows(x).abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)

    def reduce(self, ranks: Ranks) -> None:
        assert self.absmax is not None
        ranks.max_(self.absmax)


class MeanAbsObserver:
    """mean |X_j| per input feature (AWQ's activation statistic)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        rows = _rows(x)
        s = rows.abs().sum(dim=0)
        self.total = s if self.total is None else self.total + s
        self.n += rows.shape[0]

    def reduce(self, ranks: Ranks) -> None:
        assert self.total is not None
        ranks.sum_(self.total)
        self.n = int(ranks.sum_floats([float(self.n)])[0])

    @property
    def mean(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.n


class MomentsObserver:
    """Running sums of x, x^2, x^3, x^4 over every value (float64), for the kurtosis of a whole input tensor."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = torch.zeros(4, dtype=torch.float64)

    def add_batch(self, x: torch.Tensor) -> None:
        v = x.detach().reshape(-1).double()
        self.sums += torch.stack([v.sum(), v.pow(2).sum(), v.pow(3).sum(), v.pow(4).sum()]).cpu()
        self.n += v.numel()

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x - mu)^4] / var^2: 3 for a Gaussian, far larger when a few values dominate."""
        m1, m2, m3, m4 = (self.sums / max(self.n, 1)).tolist()
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return central4 / (var * var) if var > 0 else 0.0


class TokenSampleObserver:
    """A seeded sample of a module's input rows (AWQ clip search), stratified by position: every row at the first
    ``first_positions`` positions of each sequence (x [batch, seq, in]; a 2-D input, such as an expert's routed
    tokens, has no positions), and at most ``max_tokens`` of the others drawn uniformly. The first positions are the
    attention sinks, about one of which a uniform sample of 512 of 8,192 tokens holds, while in the blocks that
    write their massive activations they decide which weights matter (docs/peers.md, AWQ on Qwen2.5). ``weights``
    [rows] count each kept row for the rows it stands for (1 for a first position, rows seen / rows drawn for the
    others), so a weighted mean over the sample estimates the mean over every row without missing the sinks.

    Each row gets a key: a uniform draw in [0, 1), or, at a kept position, 1 + its row number over all batches (every
    rank's, so the keys are the ones one process would give); the rows kept are the ones with keys >= 1 and the
    ``max_tokens`` with the largest others, in descending key order, so the sample does not depend on how batches
    are divided among ranks.
    """

    def __init__(self, max_tokens: int, seed: int = 0, first_positions: int = 0) -> None:
        self.max_tokens = max_tokens
        self.first_positions = first_positions
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_seen = 0  # over all ranks' batches: the row numbers behind the kept positions' keys
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None  # float64: row numbers stay exact

    def add_batch(self, x: torch.Tensor) -> None:
        rows = _rows(x)
        keys = torch.rand(rows.shape[0], generator=self.generator).double()
        if self.first_positions and x.dim() == 3:
            at_start = (torch.arange(x.shape[1]) < self.first_positions).repeat(x.shape[0])  # [batch * seq]
            numbers = torch.arange(self.rows_seen, self.rows_seen + rows.shape[0], dtype=torch.float64)
            keys = torch.where(at_start, 1.0 + numbers, keys)
        self.rows_seen += rows.shape[0]
        if self.rows is not None:
            rows = torch.cat([self.rows, rows.to(self.rows.device)])
            keys = torch.cat([self.keys, keys])
        self._keep_top(rows, keys)

    def skip_batch(self, tokens: int) -> None:
        """Another rank's batch of ``tokens`` rows: draw (and drop) its keys and count its rows, so every row of
        every batch gets the key one process would have drawn for it."""
        torch.rand(tokens, generator=self.generator)
        self.rows_seen += tokens

    def reduce(self, ranks: Ranks) -> None:
        """The rows with the largest keys over all ranks: one process's sample (top-k of a union of top-ks). A rank
        counts the batches up to its own last one; the rank that ran the last batch has counted them all."""
        assert self.rows is not None and self.keys is not None
        every = ranks.gather((self.rows.cpu(), self.keys, self.rows_seen))
        rows = torch.cat([r for r, _, _ in every]).to(self.rows.device)
        self._keep_top(rows, torch.cat([k.cpu() for _, k, _ in every]))
        self.rows_seen = max(n for _, _, n in every)

    @property
    def weights(self) -> torch.Tensor:
        """[rows]: how many rows of all batches each kept row stands for (float32)."""
        assert self.keys is not None
        at_start = self.keys >= 1
        drawn = int((~at_start).sum())
        others_seen = self.rows_seen - int(at_start.sum())
        return torch.where(at_start, 1.0, others_seen / max(drawn, 1)).float()

    def _keep_top(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        kept_positions = int((keys >= 1).sum())
        keep = torch.topk(keys, min(self.max_tokens + kept_positions, keys.numel())).indices
        self.rows, self.keys = rows[keep.to(rows.device)], keys[keep]


class CallRecorder:
    """The full (args, kwargs) of a module's first ``max_calls`` calls, to replay it later (AWQ's loss)."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.calls: list[tuple[tuple, dict[str, Any]]] = []

    def add_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        if len(self.calls) < self.max_calls:
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((detached, dict(kwargs)))
