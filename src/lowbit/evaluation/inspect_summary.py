"""An inspection as a document: cross-layer consistency, per-kind aggregates, the findings in words (every number
computed from this run), the JSON file and the terminal tables."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any

from rich.table import Table

from lowbit.numerics.grid_usage import GridUsage
from lowbit.pipeline.inspect import ChannelStats, Inspection


def layer_kind(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[index + 1 :])


def _jaccard(a: list[int], b: list[int]) -> float | None:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else None


def consistency(inspection: Inspection) -> dict[str, Any]:
    """How stable the outlier channels are: across the residual stream's blocks, and between consecutive blocks'
    Linear inputs of one kind (Jaccard overlap of their outlier-channel sets)."""
    blocks = len(inspection.residual)
    counts = Counter(c for r in inspection.residual for c in r.outlier_channels)
    persistent = {c: n for c, n in counts.most_common() if n * 2 >= blocks}
    by_kind: dict[str, list[ChannelStats]] = defaultdict(list)
    for s in inspection.inputs:
        by_kind[layer_kind(s.name)].append(s)
    overlap: dict[str, float | None] = {}
    for kind, rows in by_kind.items():
        pairs = [j for a, b in zip(rows, rows[1:]) if (j := _jaccard(a.outlier_channels, b.outlier_channels)) is not None]
        overlap[kind] = sum(pairs) / len(pairs) if pairs else None
    token_shares = [v for r in inspection.residual for v in r.token_share.values()]
    return {
        "residual_persistent_channels": persistent,  # channel -> blocks (of all) in which it is an outlier
        "residual_blocks": blocks,
        "residual_mean_token_share": sum(token_shares) / len(token_shares) if token_shares else None,
        "input_overlap_between_consecutive_blocks": overlap,
    }


def kind_aggregates(inspection: Inspection) -> dict[str, dict[str, float]]:
    """Per Linear-input kind, medians over blocks of the numbers a user compares (zero shares, salient errors)."""
    by_kind: dict[str, list[ChannelStats]] = defaultdict(list)
    for s in inspection.inputs:
        by_kind[layer_kind(s.name)].append(s)
    out: dict[str, dict[str, float]] = {}
    for kind, rows in by_kind.items():
        agg: dict[str, float] = {"max_ratio": max(r.ratio for r in rows), "max_abs": max(r.max_abs for r in rows)}
        for bits in ("int8", "int4"):
            for scheme in ("per_tensor", "per_token", "smoothed_per_tensor"):
                agg[f"act_{bits}_{scheme}_zero_share"] = statistics.median(r.activations[bits][scheme].zero_share for r in rows)
        grids = next(iter(rows[0].weights.values()))["int4"].keys()
        for grid in grids:
            agg[f"weight_int4_{grid}_zero_share"] = statistics.median(
                w["int4"][grid].zero_share for r in rows for w in r.weights.values()
            )
        for case in ("quantized", "salient_kept", "random_kept"):
            agg[f"salient_{case}"] = statistics.median(e[case] for r in rows for e in r.salient.values())
        out[kind] = agg
    return out


def findings(inspection: Inspection) -> list[str]:
    """The diagnosis in sentences; each number comes from this inspection."""
    s = inspection.settings
    inputs = inspection.inputs
    worst = max(inputs, key=lambda r: r.ratio)
    flagged = [r for r in inputs if r.outliers_by_threshold]
    total_channels = sum(r.in_features for r in inputs)
    by_ratio = sum(len(r.outliers_by_ratio) for r in inputs)
    over = sum(len(r.outliers_by_threshold) for r in inputs)
    int8 = worst.activations["int8"]
    lines = [
        f"Outlier channels: {by_ratio} of {total_channels} Linear input channels ({100 * by_ratio / total_channels:.2f}%) "
        f"exceed {s.ratio:g}x their input's median channel, up to {worst.ratio:,.0f}x; {over} "
        f"({100 * over / total_channels:.1f}%, in {len(flagged)} of {len(inputs)} inputs) reach |x| > {s.threshold:g}, "
        f"LLM.int8()'s float path.",
        f"Most stretched input: {worst.name} (max |x| {worst.max_abs:,.1f}, {worst.ratio:,.0f}x the median channel, "
        f"kurtosis {worst.kurtosis:,.0f}). Per-tensor INT8 rounds {100 * int8['per_tensor'].zero_share:.1f}% of its "
        f"values to zero ({int8['per_tensor'].effective_levels:.1f} effective levels); per-token INT8 "
        f"{100 * int8['per_token'].zero_share:.1f}% ({int8['per_token'].effective_levels:.1f}); after SmoothQuant "
        f"smoothing (alpha {s.smooth_alpha:g}) {100 * int8['smoothed_per_tensor'].zero_share:.1f}% "
        f"({int8['smoothed_per_tensor'].effective_levels:.1f}).",
    ]
    c = consistency(inspection)
    persistent = c["residual_persistent_channels"]
    if persistent:
        listed = ", ".join(f"{ch} ({n}/{c['residual_blocks']} blocks)" for ch, n in list(persistent.items())[:5])
        lines.append(f"Residual-stream outlier channels persist across depth: {listed}.")
    else:
        lines.append("No residual-stream channel is an outlier in half of the blocks or more.")
    salient = [e for r in inputs for e in r.salient.values()]
    helped = sum(e["salient_kept"] < e["random_kept"] for e in salient)
    med = {k: statistics.median(e[k] for e in salient) for k in ("quantized", "salient_kept", "random_kept")}
    lines.append(
        f"Salient weights (AWQ, INT{s.salient_bits} g{s.group_size}): keeping the {100 * s.salient_share:g}% of columns "
        f"with the largest mean |x| in float lowers the median Linear output error from {med['quantized']:.4f} to "
        f"{med['salient_kept']:.4f}; the same number of random columns gives {med['random_kept']:.4f} "
        f"(activation-chosen columns win on {helped} of {len(salient)} Linears)."
    )
    weights = [w["int4"] for r in inputs for w in r.weights.values()]
    grids = list(weights[0])
    shares = ", ".join(f"{g.replace('_', '-')} {100 * statistics.median(w[g].zero_share for w in weights):.1f}%" for g in grids)
    lines.append(f"Weights at INT4, median share of values rounded to zero: {shares}.")
    lines.append(_float_finding(inputs))
    return lines


def _float_finding(inputs: list[ChannelStats]) -> str:
    """The float grids' median zero shares, next to the integer grids' above."""
    def median_share(usages: list[dict[str, GridUsage]], key: str) -> str:
        shares = [u[key].zero_share for u in usages if key in u]
        return f"{100 * statistics.median(shares):.1f}%" if shares else "n/a (widths)"

    acts = [r.activations.get("float", {}) for r in inputs]
    weights = [w.get("float", {}) for r in inputs for w in r.weights.values()]
    return ("Float grids, median share of values rounded to zero: inputs FP8 per-tensor "
            f"{median_share(acts, 'fp8_per_tensor')}, per-token {median_share(acts, 'fp8_per_token')}, NVFP4 "
            f"{median_share(acts, 'nvfp4')}, MXFP4 {median_share(acts, 'mxfp4')}; weights FP8 per-channel "
            f"{median_share(weights, 'fp8_per_channel')}, NVFP4 {median_share(weights, 'nvfp4')}, MXFP4 "
            f"{median_share(weights, 'mxfp4')}.")


def inspection_json(inspection: Inspection) -> dict[str, Any]:
    return {
        "settings": asdict(inspection.settings),
        "calibration": inspection.calibration,
        "findings": findings(inspection),
        "consistency": consistency(inspection),
        "by_kind": kind_aggregates(inspection),
        "residual": [r.to_dict() for r in inspection.residual],
        "inputs": [r.to_dict() for r in inspection.inputs],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _channels(stats: ChannelStats) -> str:
    channels = sorted(stats.outlier_channels, key=lambda c: -stats.token_share.get(c, 0.0))
    shown = ", ".join(f"{c} ({_pct(stats.token_share[c])})" for c in channels[:3])
    return f"{len(channels)}: {shown}" + (" ..." if len(channels) > 3 else "") if channels else "0"


def inputs_table(inspection: Inspection) -> Table:
    table = Table(title="activation outliers per Linear input (INT8 zero share: per-tensor / per-token / smoothed)")
    for column in ("input of", "max |x|", "max/median", "kurtosis", "outlier ch. (token share)", "INT8 zero share",
                   "INT8 levels"):
        table.add_column(column, justify="left" if column in ("input of", "outlier ch. (token share)") else "right")
    for r in inspection.inputs:
        a = r.activations["int8"]
        name = r.name + (f" (+{', '.join(r.shared_with)})" if r.shared_with else "")
        table.add_row(
            name, f"{r.max_abs:,.1f}", f"{r.ratio:,.0f}", f"{r.kurtosis:,.0f}", _channels(r),
            " / ".join(_pct(a[k].zero_share) for k in ("per_tensor", "per_token", "smoothed_per_tensor")),
            " / ".join(f"{a[k].effective_levels:.1f}" for k in ("per_tensor", "per_token", "smoothed_per_tensor")),
        )
    return table


def residual_table(inspection: Inspection) -> Table:
    table = Table(title="residual stream entering each block")
    for column in ("block", "max |x|", "max/median", "kurtosis", "outlier ch. (token share)", "INT8 zero share per-tensor"):
        table.add_column(column, justify="left" if column.startswith("outlier") else "right")
    for r in inspection.residual:
        table.add_row(str(r.block), f"{r.max_abs:,.1f}", f"{r.ratio:,.0f}", f"{r.kurtosis:,.0f}", _channels(r),
                      _pct(r.activations["int8"]["per_tensor"].zero_share))
    return table


def kind_table(inspection: Inspection) -> Table:
    s = inspection.settings
    table = Table(title=f"per Linear kind (medians over blocks): weights at INT4, salient columns at INT{s.salient_bits} g{s.group_size}")
    columns = ("Linear input", "max ratio", "W zero share per-tensor / per-channel / g", "error: all quantized",
               f"{100 * s.salient_share:g}% salient kept", "random kept")
    for column in columns:
        table.add_column(column, justify="left" if column == "Linear input" else "right")
    for kind, agg in kind_aggregates(inspection).items():
        weight = " / ".join(_pct(v) for k, v in agg.items() if k.startswith("weight_int4"))
        table.add_row(kind, f"{agg['max_ratio']:,.0f}", weight, f"{agg['salient_quantized']:.4f}",
                      f"{agg['salient_salient_kept']:.4f}", f"{agg['salient_random_kept']:.4f}")
    return table
