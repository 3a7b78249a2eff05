"""Write docs/architectures.md: every causal-LM model type of the installed transformers, as a tiny random model,
through RTN, GPTQ, AWQ and SmoothQuant W8A8 (tests/coverage.py); exits 1 when any type is wrong or crashes.
tests/test_coverage.py checks the same outcomes in CI, and that the page states them. Usage: .venv/bin/python bench/coverage.py   (about 2 minutes on 2 cores)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402

from coverage import HEADER, METHODS, causal_lm_types, coverage, quiet, table_row  # noqa: E402

PAGE = ROOT / "docs" / "architectures.md"
RESULTS = ROOT / "bench" / "results" / "coverage.json"


def main() -> int:
    quiet()
    rows, untested, errors = [], [], {}
    for model_type in causal_lm_types():
        outcome = coverage(model_type)
        if outcome is None:
            untested.append(model_type)
            continue
        print(table_row(outcome), flush=True)
        rows.append(outcome)
        errors[model_type] = outcome.errors
    works = [o for o in rows if all(s == "ok" for s in o.methods.values())]
    failed = [o.model_type for o in rows if o.failed]
    worst = {m: max((e[m] for e in errors.values() if m in e), default=0.0) for m in METHODS}
    lines = [
        "# Model types",
        "",
        f"Every causal-LM model type of transformers {transformers.__version__} (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, "
        f"{len(causal_lm_types())} types), built as a tiny random model from its own config class (hidden size 64, "
        "two blocks, random non-zero biases and norm weights), quantized in memory with RTN W4 g32, GPTQ W4 g32, AWQ "
        "W4 g32 and SmoothQuant + W8A8 (per-channel INT8 weights, per-token dynamic INT8 inputs). `ok`: the quantized "
        "model's logits are within the method's tolerance of the float model's (relative error at most 0.5 for W4 "
        "and 0.1 for W8A8, or 20x / 4x the model's own error under near-lossless RTN W8 per-channel where that is "
        "larger: a few random tiny models amplify any perturbation); `refused`: one `lowbit: error:` line saying what lowbit cannot handle. No type exits 0 with a "
        "model outside the tolerance (`wrong`) or crashes: `tests/test_coverage.py` checks every row in CI.",
        "",
        "Types outside lowbit's table (`src/lowbit/models/arch.py`) have their structure discovered "
        "(`src/lowbit/models/discover.py`): blocks, Linears and which norm feeds which Linears, traced on the meta "
        "device. Every SmoothQuant/AWQ fold is proven on the block's float32 outputs before it is kept; `folds kept` "
        "counts SmoothQuant's over both blocks.",
        "",
        f"Measured by `.venv/bin/python bench/coverage.py`: **{len(works)} of {len(rows)} tested types work with every "
        f"method**, {len(rows) - len(works)} are refused with the reason below; {len(failed)} wrong or crashed. "
        f"Largest relative logits error among the types that work: "
        + ", ".join(f"{m} {worst[m]:.3f}" for m in METHODS) + ".",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
        *(table_row(o) for o in rows),
        "",
        f"Not tested ({len(untested)}): their config class cannot be made tiny by the settings above, or the tiny "
        "model does not run on token ids alone (encoder-decoders, multimodal wrappers): " + ", ".join(untested) + ".",
        "",
    ]
    PAGE.write_text("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"transformers": transformers.__version__, "errors": errors, "untested": untested,
                                   "failed": failed}, indent=2))
    print(f"{len(works)} of {len(rows)} tested types work; written to {PAGE} and {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
