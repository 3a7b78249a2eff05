"""`lowbit export`: a lowbit output directory in a format a serving engine loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli.common import console
from lowbit.errors import LowbitError
from lowbit.evaluation.units import mib
from lowbit.io.atomic import check_output_dir, check_output_file

FORMATS = ("compressed-tensors", "gguf", "gptq")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a lowbit output as compressed-tensors (vLLM), GGUF (llama.cpp / ollama) "
                       "or a GPTQ checkpoint (vLLM, transformers + gptqmodel, ExLlama)")
    e.add_argument("model", help="a lowbit output directory")
    e.add_argument("--format", choices=FORMATS, required=True,
                   help="compressed-tensors: pack-quantized (weight-only) or int-quantized (W8A8) folder; gguf: Q8_0 / Q4_0 / Q4_1 file from W8 / W4 g32 grids; "
                        "gptq: GPTQ checkpoint folder from INT2/3/4/8 weight-only grids")
    e.add_argument("--out", required=True, help="the output folder (compressed-tensors, gptq) or file (gguf, e.g. model.gguf)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from lowbit.api import load
    from lowbit.export.compressed_tensors import write_compressed_tensors
    from lowbit.export.gguf import write_gguf
    from lowbit.export.gptq_checkpoint import write_gptq
    from lowbit.models.source import resolve_model

    source = resolve_model(args.model)
    if not source.is_lowbit:
        raise LowbitError(f"{args.model} is not a lowbit output; quantize it first (`lowbit quantize ... --out DIR`)")
    out = Path(args.out)
    if args.format == "compressed-tensors":
        check_output_dir(out, args.overwrite, inputs=[source.folder])
        config = write_compressed_tensors(source.folder, load(source.folder), out, args.overwrite)
        if config is None:
            console.print(f"wrote {out}: pruned Linears as dense weights (compressed-tensors has no sparse format since 0.15)")
        else:
            console.print(f"wrote {out}: {len(config['config_groups'])} quantization group(s), format {config['format']}")
        return 0
    if args.format == "gptq":
        check_output_dir(out, args.overwrite, inputs=[source.folder])
        config = write_gptq(source.folder, load(source.folder), out, args.overwrite)
        console.print(f"wrote {out}: GPTQ checkpoint, {config['bits']}-bit, group size {config['group_size']}, "
                      f"format {config['checkpoint_format']}")
        return 0
    check_output_file(out, args.overwrite, inputs=[source.folder])  # before the model is loaded
    types = write_gguf(source.folder, load(source.folder), out, args.overwrite)
    counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
    console.print(f"wrote {out} ({mib(out.stat().st_size)}): " + ", ".join(f"{n} Linears as {t}" for t, n in counts.items()))
    return 0
