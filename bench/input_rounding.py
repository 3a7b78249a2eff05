"""What rounding a Linear's input costs at run time, per format, next to the matmul it feeds.

Each input-quantizing output rounds every Linear's input in every forward (runtime/, numerics/float_quant.py,
numerics/activations.py, runtime/llm_int8.py). This times, on one input of --tokens x --features (default SmolLM2's
1024 x 576): the matmul of a square Linear of that width; each format's run-time rounding; and, for the float
formats, the same values computed the reference way (the element codes and their values, as weights are stored,
through PyTorch's float8 casts and E2M1's comparisons and table), which the run-time forms equal bit for bit
(tests/test_float_formats.py). Medians of --repeats timings of --inner calls each.

    OMP_NUM_THREADS=2 .venv/bin/python bench/input_rounding.py [--tokens 1024] [--features 576]

Writes bench/results/input_rounding.json (with the CPU and its instruction sets) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def milliseconds(fn: Callable[[], object], repeats: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "input_rounding.json")
    args = parser.parse_args()
    from lowbit.evaluation.speed import machine_description
    from lowbit.numerics.activations import quantize_activations
    from lowbit.numerics.float_formats import FLOAT_TYPES, block_scales, element_codes, element_values
    from lowbit.numerics.float_quant import quantize_float_inputs
    from lowbit.runtime.llm_int8 import outlier_columns

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.features) * 2
    x[:, 7] *= 40  # an outlier channel, as real inputs have
    weight = torch.randn(args.features, args.features)
    fp8, nvfp4, mxfp4 = FLOAT_TYPES["FP8"], FLOAT_TYPES["NVFP4"], FLOAT_TYPES["MXFP4"]
    nv_global = torch.tensor([448.0 * 6.0]) / x.abs().amax()
    static_step = x.abs().amax() / 448.0

    def reference_blocks(ft, global_=None):  # noqa: ANN001, ANN202
        blocks = x.reshape(args.tokens, -1, ft.block)
        _, step = block_scales(blocks.abs().amax(dim=-1), ft, global_)
        step = step.unsqueeze(-1)
        return (element_values(element_codes(blocks / step, ft), ft) * step).reshape(x.shape)

    def reference_fp8():  # noqa: ANN202
        _, step = block_scales(x.abs().amax(dim=-1, keepdim=True), fp8)
        return element_values(element_codes(x / step, fp8), fp8) * step

    def reference_outliers():  # noqa: ANN202
        return (x.abs() > 6.0).reshape(-1, x.shape[-1]).any(dim=0)

    x8 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    rows = {
        f"matmul, {args.features} x {args.features} Linear": (lambda: x @ weight.T, None),
        "INT8 per token (W8A8)": (lambda: quantize_activations(x, 8, per_token=True, symmetric=True), None),
        "FP8 per token": (lambda: quantize_float_inputs(x, fp8, per_token=True), reference_fp8),
        "FP8 static": (lambda: quantize_float_inputs(x, fp8, static_scale=static_step),
                       lambda: element_values(element_codes(x / static_step, fp8), fp8) * static_step),
        "MXFP4": (lambda: quantize_float_inputs(x, mxfp4), lambda: reference_blocks(mxfp4)),
        "NVFP4": (lambda: quantize_float_inputs(x, nvfp4, global_=nv_global), lambda: reference_blocks(nvfp4, nv_global)),
        "LLM.int8() outlier columns": (lambda: outlier_columns(x, 6.0), reference_outliers),
        "float8_e4m3fn -> float32 cast": (lambda: x8.float(), None),
    }
    results = []
    for name, (run, reference) in rows.items():
        if reference is not None:
            assert torch.equal(run(), reference()), f"{name}: the run-time form differs from the reference"
        ms = milliseconds(run, args.repeats, args.inner)
        ref_ms = milliseconds(reference, args.repeats, args.inner) if reference is not None else None
        results.append({"what": name, "ms": round(ms, 3), "reference_ms": None if ref_ms is None else round(ref_ms, 3)})
        print(results[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_description(), "shape": [args.tokens, args.features],
                                    "command": "bench/input_rounding.py " + " ".join(sys.argv[1:]),
                                    "rows": results}, indent=1) + "\n")
    print(f"\n| {args.tokens} x {args.features} input | run-time form, ms | reference form, ms |\n|---|---:|---:|")
    for r in results:
        ref = "" if r["reference_ms"] is None else f"{r['reference_ms']:.2f}"
        print(f"| {r['what']} | {r['ms']:.2f} | {ref} |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
