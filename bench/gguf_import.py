"""GGUF import cost: wall time and peak RSS of converting a GGUF file to lowbit's cached Hugging Face folder, each in
a fresh process, with the streaming importer (src/lowbit/models/gguf_import.py) writing bfloat16 (the default) and
float32, and, for comparison, transformers' whole-model loading in float32 (what lowbit did before).

The streaming rows also give the import floor: the peak RSS of everything before the first tensor (Python, torch,
transformers, the GGUF's config and tokenizer, the meta skeleton, the memory-mapped tensor table), measured in the
same process first; the target is peak <= floor + 1.5 x the largest tensor in float32.
Prints a table and writes bench/results/gguf_import.json.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_import.py [--modes streaming-bfloat16,...] FILE.gguf [...]
(results of earlier runs for other files are kept; a file's rows are replaced)
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
import json, resource, shutil, sys, tempfile, time
from pathlib import Path
import torch
path, mode = Path(sys.argv[1]), sys.argv[2]
out = Path(tempfile.mkdtemp(dir=sys.argv[3]))
start = time.perf_counter()
floor = None
if mode.startswith("streaming"):
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from lowbit.models.gguf_import import _convert, _read_metadata
    config, tokenizer, parsed = _read_metadata(path)
    with init_empty_weights(include_buffers=True):
        skeleton = AutoModelForCausalLM.from_config(config)
    mapped = GGUFReader(str(path))
    del config, tokenizer, parsed, skeleton, mapped
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    names = _convert(path, out, getattr(torch, mode.split("-")[1]))
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
seconds = time.perf_counter() - start
cache_mib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
shutil.rmtree(out)
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "floor_rss_mib": floor,
                  "largest_tensor_mib": largest / 2**20, "cache_mib": cache_mib}))
"""
MODES = ("streaming-bfloat16", "streaming-float32", "transformers")


def main() -> int:
    args = sys.argv[1:]
    modes = MODES
    if args[:1] == ["--modes"]:
        modes, args = tuple(args[1].split(",")), args[2:]
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for name in args:
        path = Path(name).resolve()
        rows = [r for r in rows if not (r["file"] == path.name and r["importer"] in modes)]
        for mode in modes:
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # removed even if the child is killed
                done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, scratch], capture_output=True,
                                      text=True, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = {"file": path.name, "gguf_mib": path.stat().st_size / 2**20, "importer": mode,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            bound = ""
            if row["floor_rss_mib"] is not None:
                row["bound_mib"] = row["floor_rss_mib"] + 1.5 * row["largest_tensor_mib"]
                bound = (f"  floor {row['floor_rss_mib']:6.0f} + 1.5 x largest = {row['bound_mib']:6.0f} MiB: "
                         f"{'within' if row['peak_rss_mib'] <= row['bound_mib'] else 'OVER'}")
            print(f"{row['file']:40s} {mode:18s} {row['gguf_mib']:7.0f} MiB file  {row['seconds']:6.1f} s  "
                  f"peak RSS {row['peak_rss_mib']:7.0f} MiB  largest tensor {row['largest_tensor_mib']:6.0f} MiB  "
                  f"cache {row['cache_mib']:7.0f} MiB{bound}", flush=True)
    from lowbit.evaluation.speed import machine_description

    RESULTS.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
