"""Run-time cost of a loaded model: resident memory, prefill and decode throughput (seed 003: space savings and
speed-ups are two different things, so both are measured, never inferred from the bit width).

Prefill: one forward over ``prefill_tokens`` tokens at batch 1. Decode: greedy generation with the KV cache at batch
1 and 8; the per-token rate is (tokens of a long run - tokens of a 1-token run) / (time difference), so the prompt's
prefill is not counted as decoding. Every figure is the median of ``repeats`` runs after one warm-up.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class SpeedResult:
    prefill_tokens_per_second: float
    decode_tokens_per_second: dict[int, float]  # batch size -> generated tokens per second (all sequences)


# the instruction sets that decide which low-bit CPU kernels are fast: the same code measured 0.67x of fp32 prefill
# for W4 on one machine and 1.3-1.5x on one with AVX-512 BF16/VNNI (README, "Runtime")
_KERNEL_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "asimd", "sve")


def machine_description(device: torch.device | str = "cpu") -> dict[str, object]:
    """What a speed figure was measured on: CPU model and its kernel-relevant instruction sets, threads, torch,
    and the GPU when the device is one."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    description: dict[str, object] = {
        "cpu": cpu, "isa": [f for f in _KERNEL_ISA if f in flags], "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.device(device).type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def machine_line(machine: Mapping[str, Any]) -> str:
    """A ``machine_description`` as one line of a report, e.g. "AMD EPYC 7763 (avx2, avx512f), 16 threads, torch
    2.6.0", led by "NVIDIA H200 on " when a GPU did the work."""
    isa = f" ({', '.join(machine['isa'])})" if machine["isa"] else ""
    line = f"{machine['cpu']}{isa}, {machine['threads']} threads, torch {machine['torch']}"
    return f"{machine['gpu']} on {line}" if "gpu" in machine else line


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model: nn.Module, vocab_size: int, *, prefill_tokens: int = 512, new_tokens: int = 32, batches: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 16, repeats: int = 3, seed: int = 0,
) -> SpeedResult:
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prefill_tokens), generator=generator).to(device)

    def prefill() -> None:
        model(ids, use_cache=False)
        _sync(device)

    prefill_rate = prefill_tokens / _median_seconds(prefill, repeats)
    decode: dict[int, float] = {}
    for batch in batches:
        prompt = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=generator).to(device)

        def generate(n: int) -> None:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            _sync(device)

        long = _median_seconds(lambda: generate(new_tokens), repeats)
        short = _median_seconds(lambda: generate(1), repeats)
        decode[batch] = batch * (new_tokens - 1) / max(long - short, 1e-9)
    return SpeedResult(prefill_rate, decode)
