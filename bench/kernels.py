"""Which matmul backend is fastest for quantized weights on this machine? Times every backend lowbit could use for
one Linear, at decode (1 token) and prefill (512 tokens), and checks each against lowbit's dequantized weight.

    .venv/bin/python bench/kernels.py [--out bench/results/kernels.json]

Backends: fp32 and bf16 dense F.linear (the baselines); lowbit's WeightOnlyLinear (unpack + dequantize + F.linear,
what `lowbit.load` uses); PyTorch's int8 kernel `_weight_int8pack_mm` (W8 per-channel symmetric) and int4 kernel
`_weight_int4pack_mm_for_cpu` (W4 g128); and W8A8 as lowbit's fast backend runs it (per-token INT8 inputs x INT8
weights on `torch._int_mm`, against the fake-quant reference). Median of 3-20 timed runs after warm-up. Run on an
idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.evaluation.speed import machine_description
from lowbit.numerics.activations import quantize_activations
from lowbit.numerics.rtn import rtn
from lowbit.recipe import WeightQuant
from lowbit.runtime.act_quant import ActQuantLinear
from lowbit.runtime.weight_only import WeightOnlyLinear

SHAPES = [(1536, 576), (576, 1536), (11008, 4096)]  # (out, in): SmolLM2's MLP, and Llama-7B's up_proj from the brief


def median_ms(fn: Callable[[], torch.Tensor]) -> float:
    """Median over as many runs as fit in about 2 s (3 to 20), after warm-up; slow kernels get the minimum."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    repeats = max(3, min(20, int(2.0 / max(first, 1e-6))))
    for _ in range(2 if first < 0.5 else 0):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def int4pack_backend(W: torch.Tensor, group_size: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """PyTorch's CPU int4 kernel with lowbit's asymmetric g128 codes: w = (q - 8) * scale + (8 - zero) * scale."""
    qweight = rtn(W, WeightQuant(bits=4, symmetric=False, group_size=group_size))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qweight.codes.to(torch.int32), 2)
    scale = qweight.scale.float()  # [out, n_groups]
    zero = (8.0 - qweight.zero.float()) * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)), qweight.dequantize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/kernels.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for out_features, in_features in SHAPES:
        W = torch.randn(out_features, in_features) / in_features**0.5
        w8 = WeightOnlyLinear.from_qweight(rtn(W, WeightQuant(bits=8, symmetric=True, granularity="channel")), None)
        w4 = WeightOnlyLinear.from_qweight(rtn(W, WeightQuant(bits=4, symmetric=False, group_size=128)), None)
        w8a8 = ActQuantLinear.from_qweight(rtn(W, WeightQuant(bits=8, symmetric=True, granularity="channel")), None)
        w8a8 = w8a8.fast_module()  # torch._int_mm (runtime/fast.py)
        int8_weight = (w8.unpacked().codes.to(torch.int16) - 128).to(torch.int8)
        int8_scales = w8.scales.float().flatten()
        int4_mm, int4_reference = int4pack_backend(W, 128)
        W_bf16 = W.to(torch.bfloat16)
        for tokens in (1, 512):
            x = torch.randn(tokens, in_features)
            xb = x.to(torch.bfloat16)
            backends: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
                "fp32 dense": (lambda: F.linear(x, W), F.linear(x, W)),
                "bf16 dense": (lambda: F.linear(xb, W_bf16), F.linear(x, W)),
                "lowbit W8 (dequantize + matmul)": (lambda: w8(x), F.linear(x, w8.dequantized_weight())),
                "lowbit W4 g128 (dequantize + matmul)": (lambda: w4(x), F.linear(x, w4.dequantized_weight())),
                "torch _weight_int8pack_mm (W8)": (
                    lambda: torch.ops.aten._weight_int8pack_mm(x, int8_weight, int8_scales), F.linear(x, w8.dequantized_weight())),
                "torch _weight_int4pack_mm_for_cpu (W4 g128)": (lambda: int4_mm(xb), F.linear(x, int4_reference)),
                "W8A8 per-token on torch._int_mm (fast backend)": (
                    lambda: w8a8(x), F.linear(quantize_activations(x, 8, True, True), w8.dequantized_weight())),
            }
            for name, (fn, reference) in backends.items():
                try:
                    result = fn().float()
                except RuntimeError as exc:  # a kernel this build or CPU lacks
                    rows.append({"shape": [out_features, in_features], "tokens": tokens, "backend": name, "error": str(exc)[:200]})
                    continue
                error = float((result - reference).norm() / reference.norm())
                rows.append({"shape": [out_features, in_features], "tokens": tokens, "backend": name,
                             "ms": round(median_ms(fn), 4), "rel_error_vs_reference": error})
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["tokens"] == row["tokens"] and r["backend"] == "fp32 dense")
        if "ms" in row:
            row["vs_fp32"] = round(base["ms"] / row["ms"], 3)
    print(f"{'shape':>12} {'tokens':>6}  {'backend':<46} {'ms':>9} {'speed vs fp32':>13} {'rel. error':>10}")
    for r in rows:
        if "ms" in r:
            print(f"{str(tuple(r['shape'])):>12} {r['tokens']:>6}  {r['backend']:<46} {r['ms']:>9.3f} {r['vs_fp32']:>12.2f}x {r['rel_error_vs_reference']:>10.1e}")
        else:
            print(f"{str(tuple(r['shape'])):>12} {r['tokens']:>6}  {r['backend']:<46} unavailable: {r['error'][:60]}")
    meta = {"machine": machine_description()}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
