"""GGUF import cost: wall time and peak RSS of converting a GGUF file to lowbit's cached Hugging Face folder, each in
a fresh process, with the streaming importer (src/lowbit/models/gguf_import.py) and, for comparison, transformers'
whole-model loading (what lowbit did before). Prints a table and writes bench/results/gguf_import.json.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_import.py FILE.gguf [FILE.gguf ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gguf_import.json"

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import torch
path, mode = Path(sys.argv[1]), sys.argv[2]
out = Path(tempfile.mkdtemp())
start = time.perf_counter()
if mode == "streaming":
    from lowbit.models.gguf_import import _convert
    names = _convert(path, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from lowbit.models.checkpoint import CheckpointReader
    reader = CheckpointReader(out)  # shapes from the headers: nothing more is read
    largest = max(4 * torch.Size(reader.shape(n)).numel() for n in names)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding, stored once (as lowbit's old importer did)
    save_file(state, str(out / "model.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak / 1024,
                  "largest_tensor_mib": largest / 2**20}))
"""


def main() -> int:
    rows = []
    for name in sys.argv[1:]:
        path = Path(name).resolve()
        for mode in ("streaming", "transformers"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                                  env={**__import__("os").environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = {"file": path.name, "gguf_mib": path.stat().st_size / 2**20, "importer": mode,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{row['file']:45s} {mode:12s} {row['gguf_mib']:8.0f} MiB file  {row['seconds']:6.1f} s  "
                  f"peak RSS {row['peak_rss_mib']:7.0f} MiB  largest tensor {row['largest_tensor_mib']:6.0f} MiB",
                  flush=True)
    from lowbit.evaluation.speed import machine_description

    RESULTS.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
