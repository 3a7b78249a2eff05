"""`lowbit recipes`: list the presets, or print one as JSON (a starting point for a custom recipe file)."""

from __future__ import annotations

import argparse

from rich.table import Table

from lowbit.cli.common import console
from lowbit.presets import preset_names, resolve_recipe


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recipes", help="list preset recipes, or print one as JSON")
    r.add_argument("name", nargs="?", help="print this preset as a JSON recipe")
    r.set_defaults(func=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    if args.name:
        print(resolve_recipe(args.name).to_json())
        return 0
    table = Table(title="preset recipes (lowbit quantize --recipe NAME)")
    table.add_column("name")
    table.add_column("what it does")
    for name, description in preset_names().items():
        table.add_row(name, description)
    console.print(table)
    return 0
