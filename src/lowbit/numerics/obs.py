"""GPTQ and SparseGPT: one Optimal-Brain-Surgeon sweep over columns with lazy block updates.

Columns are visited left to right (or in act-order: by descending H_jj). Each column is rounded to the grid and/or
pruned; its error, scaled by the inverse Hessian's diagonal, is pushed onto the not-yet-visited columns of the
current block at once and onto the rest of the matrix once per block (lazy batch updates). Symbols follow the
GPTQ paper and IST-DASLab/gptq: W, H, Hinv, Q, Err.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.float_formats import FLOAT_TYPES, block_scales, element_codes, element_values
from lowbit.numerics.float_quant import FloatQWeight, check_width, group_absmax, tensor_global_scale
from lowbit.numerics.grid import group_count, round_to_grid
from lowbit.numerics.hessian import inverse_hessian, prepare_hessian
from lowbit.numerics.kquant import SUPER_BLOCK, KParams, KQWeight, fit_kparams, k_type, k_values, round_k
from lowbit.numerics.qweight import QWeight
from lowbit.numerics.rtn import fit_grid, group_size_for
from lowbit.methods.base import WeightQuant


@dataclass
class ObsResult:
    weight: torch.Tensor  # W_hat [out, in] float32: dequantized and/or pruned
    qweight: QWeight | KQWeight | FloatQWeight | None  # set when a grid was given
    pruned: torch.Tensor  # bool [out, in], True where the weight was removed
    damp: float
    retries: int


class _Grid:
    """Scale/zero per group, fitted lazily as the sweep reaches each group, from the error-updated weights; or up
    front from the original weights (``upfront``; always so for static groups, which stay in column order)."""

    def __init__(
        self,
        spec: WeightQuant,
        W: torch.Tensor,
        perm: torch.Tensor | None,
        static_groups: bool,
        upfront: bool,
        importance: torch.Tensor,
    ) -> None:
        self.spec = spec
        self.n = W.shape[1]
        self.gs = group_size_for(spec, self.n)
        self.grouped = spec.granularity == "group" and self.gs < self.n
        self.perm = perm
        self.static = static_groups and self.grouped
        self.n_groups = group_count(self.n, self.gs) if self.grouped else 1
        self.scale: list[torch.Tensor | None] = [None] * self.n_groups
        self.zero: list[torch.Tensor | None] = [None] * self.n_groups
        # a "llama" fit weighs each column by its importance (the Hessian's diagonal, in the groups' column order)
        # and each row by its mean w^2, taken once from the original weights
        sweep_order = perm is not None and self.grouped and not self.static
        self.importance = importance[perm] if sweep_order else importance
        self.sigma2 = W.pow(2).mean(dim=1) if spec.fit == "llama" else None  # [out]
        if not self.grouped or self.static or upfront:
            # groups in sweep order unless static: [out or 1, n_groups]
            ordered = W[:, perm] if sweep_order else W
            scale, zero = fit_grid(ordered, spec, self.importance, self.sigma2)
            for g in range(self.n_groups):
                self.scale[g], self.zero[g] = scale[:, g], zero[:, g]

    def group_of(self, col: int) -> int:
        """Group of the column at sweep position ``col``."""
        if not self.grouped:
            return 0
        if self.static and self.perm is not None:
            return int(self.perm[col]) // self.gs
        return col // self.gs

    def needs_fit(self, col: int) -> bool:
        return self.scale[self.group_of(col)] is None

    def fit(self, col: int, upcoming: torch.Tensor) -> None:
        """Fit the group the sweep enters at ``col`` from ``upcoming`` [out, >=1]: the current (error-updated)
        values of the group's columns."""
        g = self.group_of(col)
        scale, zero = fit_grid(upcoming[:, : self.gs], self.spec, self.importance[col : col + self.gs], self.sigma2)
        self.scale[g], self.zero[g] = scale[:, 0], zero[:, 0]

    def params(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale/zero [out or 1] for sweep column ``col``."""
        g = self.group_of(col)
        return self.scale[g], self.zero[g]  # type: ignore[return-value]

    def g_idx(self, invperm: torch.Tensor | None) -> torch.Tensor | None:
        """Group of each ORIGINAL column when act-order made groups non-contiguous, else None."""
        if not self.grouped or invperm is None or self.static:
            return None
        return (torch.arange(self.n, device=invperm.device) // self.gs)[invperm].to(torch.int32)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.scale, dim=-1), torch.stack(self.zero, dim=-1)  # type: ignore[arg-type]


class _KGrid:
    """A K-quant grid (numerics/kquant.py) for the sweep: the params of a whole super-block of 256 columns are fitted
    at once, lazily when the sweep enters it (from the error-updated weights, as ``_Grid`` fits a group), or up
    front from the original weights under act-order (its blocks stay in column order, like static groups)."""

    def __init__(
        self, spec: WeightQuant, W: torch.Tensor, perm: torch.Tensor | None, upfront: bool, importance: torch.Tensor
    ) -> None:
        self.spec = spec
        self.kt = k_type(spec.ggml)
        self.importance = importance  # per original column
        self.gs = SUPER_BLOCK  # columns fitted at once
        out, n = W.shape
        self.perm = perm
        self.fitted: list[KParams | None] = [None] * (n // SUPER_BLOCK)
        # per ORIGINAL column, rows contiguous: step and offset [n, out]
        self.step_t = torch.zeros(n, out, device=W.device)
        self.offset_t = torch.zeros(n, out, device=W.device) if self.kt.asymmetric else None
        if perm is not None or upfront:
            for start in range(0, n, SUPER_BLOCK):
                self._set(start, W[:, start : start + SUPER_BLOCK])

    def _set(self, start: int, columns: torch.Tensor) -> None:
        """Fit the super-block of original columns start .. start + 255 from ``columns`` [out, 256]."""
        params = fit_kparams(columns, self.kt, self.importance[start : start + SUPER_BLOCK])
        self.fitted[start // SUPER_BLOCK] = params
        step, offset = params.per_column(self.kt)
        self.step_t[start : start + SUPER_BLOCK] = step.T
        if self.offset_t is not None and offset is not None:
            self.offset_t[start : start + SUPER_BLOCK] = offset.T

    def _original(self, col: int) -> int:
        return int(self.perm[col]) if self.perm is not None else col

    def needs_fit(self, col: int) -> bool:
        return self.fitted[self._original(col) // SUPER_BLOCK] is None

    def fit(self, col: int, upcoming: torch.Tensor) -> None:
        """Fit the super-block the (column-order) sweep enters at ``col`` from its current values ``upcoming``."""
        self._set(col, upcoming[:, :SUPER_BLOCK])

    def quantize(self, w: torch.Tensor, col: int, value_out: torch.Tensor) -> torch.Tensor:
        """Float codes of sweep column ``col`` (w [out]); writes their grid values into ``value_out`` [out]."""
        j = self._original(col)
        step = self.step_t[j]
        offset = self.offset_t[j] if self.offset_t is not None else None
        code = round_k(w, step, offset, self.kt)
        value_out.copy_(k_values(code, step, offset, self.kt))
        return code

    def qweight(self, codes: torch.Tensor) -> KQWeight:
        params = self.fitted
        assert all(p is not None for p in params)
        cat = [torch.cat([getattr(p, f) for p in params], dim=1) if getattr(params[0], f) is not None else None
               for f in ("d", "sc", "dmin", "m")]
        return KQWeight(codes, KParams(*cat), self.kt.name)


class _FloatGrid:
    """A float grid (FP8, MXFP4, NVFP4; numerics/float_quant.py) for the sweep: each group's scale from its absmax,
    fitted lazily as the sweep enters the group (from the error-updated weights, as ``_Grid`` fits one), or up front
    from the original weights (per-tensor and per-channel grids, act-order, whose groups stay in column order, and
    ``upfront``). NVFP4's tensor scale always comes from the original weights."""

    def __init__(
        self, spec: WeightQuant, W: torch.Tensor, perm: torch.Tensor | None, upfront: bool,
        tensor_absmax: torch.Tensor | None,
    ) -> None:
        self.ft = FLOAT_TYPES[spec.float_type]
        out, n = W.shape
        check_width(self.ft, n)
        self.per_tensor = spec.granularity == "tensor"
        self.gs = group_size_for(spec, n)
        self.perm = perm
        self.global_ = tensor_global_scale(W, self.ft, tensor_absmax)
        rows, n_groups = (1 if self.per_tensor else out), group_count(n, self.gs)
        self.fitted = [False] * n_groups
        self.stored: torch.Tensor | None = None  # [rows, n_groups] in the format's storage dtype
        self.step_t = torch.zeros(n, rows, device=W.device)  # each ORIGINAL column's step, rows contiguous
        if perm is not None or upfront or self.per_tensor or self.gs == n:
            for start in range(0, n, self.gs):
                self._set(start, W[:, start : start + self.gs])

    def _set(self, start: int, columns: torch.Tensor) -> None:
        """Fit the group of original columns start .. start + gs - 1 from ``columns`` [out, gs]."""
        stored, step = block_scales(group_absmax(columns, self.gs, self.per_tensor), self.ft, self.global_)  # [rows, 1]
        if self.stored is None:
            self.stored = torch.empty(stored.shape[0], len(self.fitted), dtype=stored.dtype, device=stored.device)
        g = start // self.gs
        self.stored[:, g : g + 1] = stored
        self.step_t[start : start + self.gs] = step.T
        self.fitted[g] = True

    def _original(self, col: int) -> int:
        return int(self.perm[col]) if self.perm is not None else col

    def needs_fit(self, col: int) -> bool:
        return not self.fitted[self._original(col) // self.gs]

    def fit(self, col: int, upcoming: torch.Tensor) -> None:
        """Fit the group the (column-order) sweep enters at ``col`` from its current values ``upcoming``."""
        self._set(col, upcoming[:, : self.gs])

    def quantize(self, w: torch.Tensor, col: int, value_out: torch.Tensor) -> torch.Tensor:
        """Element codes of sweep column ``col`` (w [out]); writes their grid values into ``value_out`` [out]."""
        step = self.step_t[self._original(col)]  # [rows]
        code = element_codes(w / step, self.ft)
        torch.mul(element_values(code, self.ft), step, out=value_out)
        return code

    def qweight(self, codes: torch.Tensor) -> FloatQWeight:
        assert self.stored is not None and all(self.fitted)
        return FloatQWeight(codes, self.stored, self.global_, self.ft.name, self.gs)


def obs_compress(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightQuant | None,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    keep_mask: torch.Tensor | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    upfront_groups: bool = False,
    shrink: float = 0.0,
    damp: float = 0.01,
    block_size: int = 128,
    tensor_absmax: torch.Tensor | None = None,
) -> ObsResult:
    """Round (``spec``) and/or prune (``sparsity`` unstructured per block, or ``nm`` = (kept, M)) W [out, in]
    using the Hessian H [in, in]. ``keep_mask`` (bool [out, in], False = already pruned) pins earlier pruning:
    those weights stay exactly zero and their removal error is compensated like any other. ``shrink`` pulls H's
    off-diagonal toward zero, H <- (1 - shrink) H + shrink diag(H): less compensation through correlations that
    the calibration tokens estimate poorly (docs/actorder.md). ``tensor_absmax``: NVFP4's tensor scale from this absmax
    (shared by the Linears a server fuses) instead of W's own."""
    out_features, n = W.shape
    if nm is not None and n % nm[1] != 0:
        raise LowbitError(f"N:M pruning needs in_features divisible by M={nm[1]}, got {n}")
    W, H, dead = prepare_hessian(W, H)
    if shrink > 0.0:
        diagonal = torch.diagonal(H).clone()
        H.mul_(1.0 - shrink).diagonal().copy_(diagonal)
    perm = invperm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        invperm = torch.argsort(perm)
    spec = spec.for_width(n) if spec is not None else None
    # each input column's importance for the grids that weigh their fit (llama.cpp's importance matrix: mean x_j^2)
    importance = torch.diagonal(H).clone()
    grid: _Grid | _KGrid | _FloatGrid | None = None
    if spec is not None and spec.float_type:
        if act_order and not static_groups:
            raise LowbitError(f"{spec.float_type} blocks are in column order; use act-order with static groups (the default)")
        grid = _FloatGrid(spec, W, perm, upfront_groups, tensor_absmax)
    elif spec is not None and spec.ggml:
        if keep_mask is not None or sparsity > 0 or nm is not None:
            raise LowbitError(f"{spec.ggml} cannot hold pruned weights exactly; round them on an integer grid")
        if act_order and not static_groups:
            raise LowbitError(f"{spec.ggml} blocks are in column order; use act-order with static groups (the default)")
        grid = _KGrid(spec, W, perm, upfront_groups, importance)
    elif spec is not None:
        grid = _Grid(spec, W, perm, static_groups, upfront_groups, importance)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        keep_mask = keep_mask[:, perm] if keep_mask is not None else None
    inv = inverse_hessian(H, damp)
    Hinv = inv.Hinv

    prunes = keep_mask is not None or sparsity > 0 or nm is not None
    codes = torch.zeros(out_features, n, dtype=torch.uint8, device=W.device)
    pruned = torch.zeros(out_features, n, dtype=torch.bool, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if keep_mask is not None:
            mask1 |= ~keep_mask[:, i1:i2]
        if sparsity > 0 and nm is None:
            # SparseGPT's adaptive mask: the block's lowest w^2 / [Hinv]_jj^2 go
            score = W1**2 / d.unsqueeze(0) ** 2
            threshold = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask1 |= score <= threshold
        codes1 = torch.zeros_like(W1)  # float codes of this block's columns
        d_cols = d.tolist()  # [Hinv]_jj as Python floats (exact float32 values): no indexing op per column
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].unsqueeze(0) ** 2
                drop = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            # the column loop is op-bound (one rank-1 update of [out, count - i] per column), so plain rounding
            # skips the masking ops that only pruning needs, and results go straight into their block columns
            q = w.masked_fill(mask1[:, i], 0.0) if prunes else w
            if grid is not None and grid.needs_fit(col):
                grid.fit(col, W[:, col : col + grid.gs])
            if isinstance(grid, (_KGrid, _FloatGrid)):  # K grids refuse pruning above; 0.0 is a float grid's code
                codes1[:, i] = grid.quantize(q, col, Q1[:, i])
                q = Q1[:, i]
            elif grid is not None:
                scale, zero = grid.params(col)
                code = round_to_grid(q, scale, zero, grid.spec.bits)
                if prunes:
                    code = torch.where(mask1[:, i], zero.expand_as(code), code)  # pruned -> exactly 0.0
                codes1[:, i] = code
                q = torch.sub(code, zero, out=Q1[:, i]).mul_(scale)
            else:
                Q1[:, i] = q
            err = torch.sub(w, q, out=Err1[:, i]).div_(d_cols[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
        codes[:, i1:i2] = codes1.to(torch.uint8)
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if invperm is not None:
        W, codes, pruned = W[:, invperm], codes[:, invperm], pruned[:, invperm]
    W[:, dead] = 0.0
    qweight: QWeight | KQWeight | FloatQWeight | None = None
    if isinstance(grid, (_KGrid, _FloatGrid)):
        qweight = grid.qweight(codes)
    elif grid is not None:
        scale, zero = grid.stacked()
        qweight = QWeight(
            codes=codes,
            scale=scale.half(),
            zero=None if grid.spec.symmetric else zero.to(torch.uint8),
            bits=grid.spec.bits,
            group_size=grid.gs,
            g_idx=grid.g_idx(invperm),
        )
    return ObsResult(W, qweight, pruned, inv.damp, inv.retries)


def gptq(W: torch.Tensor, H: torch.Tensor, spec: WeightQuant, **options) -> ObsResult:
    """GPTQ rounding of W [out, in] with Hessian H [in, in]; options as ``obs_compress``."""
    return obs_compress(W, H, spec, **options)


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    spec: WeightQuant | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    tensor_absmax: torch.Tensor | None = None,
) -> ObsResult:
    """SparseGPT pruning (unstructured ``sparsity`` or N:M ``nm``), optionally rounding jointly to ``spec``."""
    return obs_compress(W, H, spec, sparsity=0.0 if nm else sparsity, nm=nm, damp=damp, block_size=block_size,
                        tensor_absmax=tensor_absmax)
