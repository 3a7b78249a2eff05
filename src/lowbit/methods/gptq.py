"""GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.errors import LowbitError
from lowbit.methods.base import ROUND, Compression, LinearStats, Needs, Step, WeightQuant, check
from lowbit.numerics.obs import gptq


def damp_note(damp: float, retries: int) -> str:
    return f"damp raised to {damp:g} after {retries} Cholesky failure(s)" if retries else ""


@dataclass(frozen=True)
class GPTQ(Step):
    """GPTQ: H = 2XX^T/n per Linear, damped Cholesky inverse (damping raised tenfold on failure), lazy block updates,
    true-sequential order (each stage fitted to inputs from the stages already quantized)."""

    kind: ClassVar[str] = "gptq"
    stage: ClassVar[int] = ROUND
    weights: WeightQuant = field(default_factory=WeightQuant)
    act_order: bool = False
    # With act_order: keep groups of consecutive columns, fitted up front from the original weights, while the sweep
    # visits columns by descending H_jj (llm-compressor's "weight" order, GPTQModel's static_groups). False forms
    # groups in the visiting order with a g_idx per column (GPTQModel's desc_act), which lost to this on Qwen2.5 and
    # Gemma 3 and tied on SmolLM2 (docs/actorder.md) and cannot be exported to GGUF or compressed-tensors.
    static_groups: bool = True
    upfront_groups: bool = False  # fit every group's grid from the original weights before the sweep (not lazily)
    # Shrink H's off-diagonal toward zero by this fraction: where an attention sink's few tokens dominate X^T X, or a
    # Linear is wide for the tokens seen (down_proj), GPTQ otherwise fits correlations that other text does not
    # have (docs/actorder.md: 0.1 helps act-order on the three real models measured, so the -actorder presets use it;
    # in column order it was measured on one seed only, where it helped two models and cost Gemma 3 0.3%).
    shrink: float = 0.0
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    # Leave each calibration sequence's first positions out of the Hessian (0 = the paper's Hessian over every
    # token). Models that park massive activations on the attention-sink position let those tokens dominate H
    # (SmolLM2-135M, block 11 down_proj: position 0 is 95% of trace(H)). Skipping them made SmolLM2 worse (W4 g128
    # perplexity 20.75 vs 18.63): the sink's outputs matter. Kept for that experiment; act-order is the fix there.
    skip_first_positions: int = 0

    def check(self) -> None:
        check(0.0 < self.damp < 1.0, f"gptq damp must be in (0, 1), got {self.damp}", "the usual value is 0.01")
        check(0.0 <= self.shrink <= 1.0, f"gptq shrink must be in [0, 1], got {self.shrink}", "0.1 is a usual value")
        check(self.block_size >= 1, f"gptq block_size must be >= 1, got {self.block_size}")
        check(self.skip_first_positions >= 0, f"gptq skip_first_positions must be >= 0, got {self.skip_first_positions}")

    @property
    def rounds(self) -> bool:
        return True

    @property
    def sequential(self) -> bool:
        return self.true_sequential

    @property
    def label(self) -> str:
        return (f"gptq {self.weights.label}" + (" act-order" if self.act_order else "")
                + (f" shrink {self.shrink:g}" if self.shrink else ""))

    def needs(self) -> Needs:
        return Needs(hessian=True, hessian_skip_first=self.skip_first_positions)

    def compress(self, c: Compression, stats: LinearStats) -> None:
        assert stats.hessian is not None
        result = gptq(
            c.weight, stats.hessian, self.weights, keep_mask=c.keep, act_order=self.act_order,
            # static groups mean something only under act-order (column order's groups are column groups anyway)
            static_groups=self.act_order and self.static_groups, upfront_groups=self.upfront_groups,
            shrink=self.shrink, damp=self.damp, block_size=self.block_size, tensor_absmax=stats.tensor_absmax,
        )
        c.qweight = result.qweight
        c.notes.append(damp_note(result.damp, result.retries))

    def check_export(self, fmt: str) -> None:
        if fmt == "gguf" and self.act_order and not self.static_groups:
            raise LowbitError(
                "GGUF holds 32-column blocks in column order; this recipe's act-order groups follow another order: "
                "quantize with static_groups=True (the default)"
            )
