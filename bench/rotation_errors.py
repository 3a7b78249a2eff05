"""Mean relative output error per Linear kind (q_proj, ..., down_proj) over the blocks, and the error of one block,
for each `lowbit compare` output of bench/rotation.sh: where a rotation helps and where it hurts (docs/rotation.md);
written to bench/results/NAME/linear_errors.json.

usage: .venv/bin/python bench/rotation_errors.py [OUT_FOLDER (default out/bench/rotation)] [--block 11]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default="out/bench/rotation")
    parser.add_argument("--block", type=int, default=11)
    args = parser.parse_args()
    rows = {}
    for report in sorted(Path(args.folder).glob("*/quant_report.json")):
        blocks = json.loads(report.read_text())["blocks"]
        errors: dict[str, list[float]] = defaultdict(list)
        for block in blocks:
            for linear in block["linears"]:
                errors[linear["name"].rsplit(".", 1)[-1]].append(linear["rel_error"])
        rows[report.parent.name] = ({k: sum(v) / len(v) for k, v in errors.items()}, blocks[args.block]["rel_error"])
    kinds = list(next(iter(rows.values()))[0]) if rows else []
    print("| recipe | " + " | ".join(kinds) + f" | block {args.block} |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    for name, (means, block) in rows.items():
        print(f"| {name} | " + " | ".join(f"{means.get(k, float('nan')):.4f}" for k in kinds) + f" | {block:.4f} |")
    out = Path("bench/results") / Path(args.folder).name / "linear_errors.json"  # beside the compare report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({n: {"linears": m, f"block_{args.block}": b} for n, (m, b) in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
