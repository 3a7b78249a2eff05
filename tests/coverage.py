"""Model-type coverage: every causal-LM type of the installed transformers, built as a tiny random model from its
own config class, quantized with RTN, GPTQ, AWQ and SmoothQuant W8A8, and judged against the float model.

Used by tests/test_coverage.py (which checks every type and that docs/architectures.md states what it finds) and
bench/coverage.py (which writes that table). A type's outcome per method is "ok" (logits within the method's
tolerance of the float model's), "refused" (one LowbitError line: the type's structure cannot be handled) or a
failure ("wrong": exit 0 with a model off by more than the tolerance; "crash": any other exception).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import lowbit
from lowbit.errors import LowbitError
from lowbit.recipe import AWQ, GPTQ, RTN, ActQuant, SmoothQuant, WeightQuant
from toy import randomize_biases_and_norms

# every width-like setting a config class may have, shrunk; settings a class lacks are left alone
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=320, max_position_embeddings=256, head_dim=16, n_embd=64, n_layer=2, n_head=4, d_model=64,
    num_layers=2, ffn_dim=128, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, shared_expert_intermediate_size=64, n_positions=256,
    dim_ff=128, dff=128, dim_head=16,  # cpmant's and ctrl's names (their defaults, 10240 / 8192 wide, cost a minute)
)
TINY_PARAMETERS = 5_000_000  # a class whose defaults ignore the settings above is not a tiny model: not tested
W4 = WeightQuant(4, False, "group", 32)
METHODS: dict[str, tuple] = {
    "RTN": (RTN(W4),),
    "GPTQ": (GPTQ(W4),),
    "AWQ": (AWQ(W4, n_grid=5, replay_sequences=2, clip_tokens=32),),
    "SmoothQuant W8A8": (SmoothQuant(0.5), RTN(WeightQuant(8, True, "channel")), ActQuant(8, "token")),
}
# Relative error of the logits, ||q - f|| / ||f||, each method must stay within: the larger of a fixed bound and a
# multiple of the model's own sensitivity, the error of near-lossless RTN W8 per-channel on it. Most tiny models
# give W8 errors near 0.005 and W4 g32 ones near 0.1-0.3; a few random ones amplify every perturbation (cpmant:
# W8 0.05, RTN W4 g32 0.52; bench/results/coverage.json). A fold that changes the function
# gives errors far above either bound.
TOLERANCE = {"RTN": 0.5, "GPTQ": 0.5, "AWQ": 0.5, "SmoothQuant W8A8": 0.1}
SENSITIVITY_FACTOR = {"RTN": 20.0, "GPTQ": 20.0, "AWQ": 20.0, "SmoothQuant W8A8": 4.0}
W8_REFERENCE = (RTN(WeightQuant(8, True, "channel")),)
CALIBRATION = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
TEST_IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_model(model_type: str) -> torch.nn.Module | None:
    """A tiny random model of ``model_type`` with non-zero biases and norm weights, or None when its config class
    cannot be made tiny or its model cannot run (an encoder-decoder, a class needing other inputs)."""
    try:
        config = CONFIG_MAPPING[model_type]()
        if getattr(config, "is_encoder_decoder", False):
            return None
        for key, value in TINY.items():
            if hasattr(config, key):
                setattr(config, key, value)
        text = getattr(config, "text_config", None)
        if getattr(text, "hidden_size", 0) > TINY["hidden_size"]:
            return None  # a composite config whose text part keeps its full widths (llama4: 108B parameters, whose
            # meta-device twin alone takes minutes to build): not a tiny model
        with init_empty_weights():  # counted on meta first: some classes ignore the settings and would be GBs
            if sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) > TINY_PARAMETERS:
                return None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        randomize_biases_and_norms(model, 0)
        with torch.no_grad():
            model(TEST_IDS)
    except Exception:  # foreign model code: any failure means this type is not tested here
        return None
    return model


@dataclass
class Outcome:
    model_type: str
    methods: dict[str, str] = field(default_factory=dict)  # method -> "ok" | "refused" | "wrong ..." | "crash ..."
    errors: dict[str, float] = field(default_factory=dict)  # method -> relative logits error, where it ran
    folds: str = ""  # "kept/tried" SmoothQuant folds
    why: str = ""  # the refusal's reason, or the refused folds

    @property
    def failed(self) -> bool:
        return any(status.startswith(("wrong", "crash")) for status in self.methods.values())


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).norm() / reference.norm()).item()


def quantized_model(model_type: str, recipe: tuple) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(tiny_model(model_type), recipe, CALIBRATION, batch_size=2)


def coverage(model_type: str) -> Outcome | None:
    """Every method on a fresh tiny model of ``model_type``; None when no tiny model can be built."""
    reference_model = tiny_model(model_type)
    if reference_model is None:
        return None
    with torch.no_grad():
        reference = reference_model(TEST_IDS).logits
    outcome = Outcome(model_type)
    for name, recipe in METHODS.items():
        try:
            quantized = quantized_model(model_type, recipe)
            with torch.no_grad():
                error = relative_error(quantized(TEST_IDS).logits, reference)
        except LowbitError as exc:
            outcome.methods[name] = "refused"
            outcome.why = str(exc).split("discovered: ")[-1].split("; supported")[0]
            continue
        except Exception as exc:  # the coverage test reports it as a failure
            outcome.methods[name] = f"crash {type(exc).__name__}: {str(exc)[:120]}"
            continue
        outcome.errors[name] = error
        if error > TOLERANCE[name] and "W8 reference" not in outcome.errors:  # how sensitive is this model?
            with torch.no_grad():
                w8 = quantized_model(model_type, W8_REFERENCE)(TEST_IDS).logits
            outcome.errors["W8 reference"] = relative_error(w8, reference)
        allowed = max(TOLERANCE[name], SENSITIVITY_FACTOR[name] * outcome.errors.get("W8 reference", 0.0))
        outcome.methods[name] = "ok" if error <= allowed else f"wrong (relative error {error:.3f} > {allowed:.3f})"
        if name == "SmoothQuant W8A8":
            folds = [f for b in quantized.lowbit_info.report.blocks for f in b.folds]
            outcome.folds = f"{sum(f.applied for f in folds)}/{len(folds)}"
            refused = {f.prev: f.reason for f in folds if not f.applied}
            if refused:
                causes = sorted({"no weight" if "no weight" in r else "the fold changes the block's output"
                                 for r in refused.values()})
                outcome.why = f"folds into {', '.join(sorted(refused))} refused ({'; '.join(causes)})"
    return outcome


HEADER = "| model_type | RTN | GPTQ | AWQ | SmoothQuant W8A8 | folds kept | why not (all) |"


def table_row(outcome: Outcome) -> str:
    cells = [outcome.model_type, *(outcome.methods[m] for m in METHODS), outcome.folds or "-", outcome.why or ""]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def quiet() -> None:
    logging.getLogger("lowbit").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
