"""`lowbit recipes`: list the presets, or print one as JSON (a starting point for a custom recipe file)."""

from __future__ import annotations

import argparse

from lowbit.cli.common import console
from lowbit.preset_names import PRESETS, check_recipe_name


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recipes", help="list preset recipes, or print one as JSON")
    r.add_argument("name", nargs="?", type=check_recipe_name, help="print this preset as a JSON recipe")
    # loads no model: main() skips transformers' logging set-up, and the list needs no torch either
    r.set_defaults(func=run_recipes, loads_models=False)


def run_recipes(args: argparse.Namespace) -> int:
    if args.name:
        from lowbit.presets import resolve_recipe

        print(resolve_recipe(args.name).to_json())
        return 0
    from rich.table import Table

    table = Table(title="preset recipes (lowbit quantize --recipe NAME)",
                  caption="rotate-NAME: any of them with the residual stream rotated first (QuaRot: docs/rotation.md)")
    table.add_column("name")
    table.add_column("what it does")
    for name, description in PRESETS.items():
        table.add_row(name, description)
    console.print(table)
    return 0
