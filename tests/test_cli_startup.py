"""A quick first run: `lowbit --help`, a subcommand's --help, a bad option and `lowbit recipes` import neither torch
nor transformers (they took 4-5 s of imports before any of these answered), and `import lowbit` resolves its public
names on first use. Behaviour, not time: bench/cli_startup.py measures the seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lowbit
from lowbit.cli.main import main
from lowbit.errors import LowbitError

HEAVY = ("torch", "transformers", "numpy")

# runs lowbit's main() in a fresh process, then reports on stdout's last line which heavy packages it imported
RUN_MAIN = """
import json, sys
from lowbit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse: --help, usage errors
    code = exc.code
sys.stdout.flush()
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def fresh(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def run_main(*argv: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy packages imported, stdout without the report line, stderr) of `lowbit ARGV`."""
    child = fresh(RUN_MAIN, *argv)
    *out, report = child.stdout.splitlines()
    result = json.loads(report)
    return result["code"], result["heavy"], "\n".join(out), child.stderr


def test_building_the_parser_imports_no_torch_or_transformers():
    code = "import lowbit.cli.main, sys; lowbit.cli.main.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    child = fresh(code)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["False", "False"]


def test_import_lowbit_imports_no_torch_until_a_name_is_used():
    code = ("import lowbit, sys; print('torch' in sys.modules); lowbit.WeightQuant; print('torch' in sys.modules); "
            "print(lowbit.__version__)")
    child = fresh(code)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["False", "True", lowbit.__version__]


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["compare", "--help"], ["bench", "--help"],
                                  ["generate", "--help"], ["inspect", "--help"], ["recipes"]])
def test_help_and_the_recipe_list_import_no_torch(argv):
    code, heavy, out, err = run_main(*argv)
    assert code == 0 and heavy == [], (heavy, err)
    assert ("usage: lowbit" in out) if "--help" in argv else ("gptq-w4g128" in out)


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--out", "x", "--nsamples", "0"], "lowbit: error: --nsamples 0 is out of range; need --nsamples >= 1"),
    (["quantize", "--out", "x", "--recipe", "no-such-recipe"], "lowbit: error: unknown recipe 'no-such-recipe': pass a preset"),
    (["compare", "--out", "x", "--recipes", "w8", "gptq-w9g64"], "lowbit: error: unknown recipe 'gptq-w9g64'"),
    (["recipes", "awq-w4g64-actorder"], "lowbit: error: unknown recipe 'awq-w4g64-actorder'"),
])
def test_argument_errors_are_one_line_exit_2_without_torch(argv, message):
    code, heavy, out, err = run_main(*argv)
    assert code == 2 and heavy == [] and out == ""
    assert err.count("\n") == 1 and err.startswith(message), err


def test_argparse_usage_errors_keep_their_behaviour():
    child = subprocess.run([sys.executable, "-m", "lowbit.cli.main", "no-such-command"], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 2 and child.stderr.startswith("usage: lowbit")
    assert "invalid choice: 'no-such-command'" in child.stderr
    code, heavy, _, err = run_main("quantize", "--dtype", "float8")
    assert code == 2 and heavy == [] and "invalid choice: 'float8' (choose from 'float32', 'bfloat16', 'float16')" in err
    code, heavy, _, err = run_main("quantize", "--nsamples", "many")
    assert code == 2 and heavy == [] and "argument --nsamples: invalid int value: 'many'" in err


def test_public_names_resolve_on_first_use():
    import lowbit.api
    import lowbit.recipe
    from lowbit import RTN, WeightQuant  # from-imports go through __getattr__ too

    for name in lowbit.__all__:
        assert getattr(lowbit, name) is not None, name
    assert lowbit.WeightQuant is lowbit.recipe.WeightQuant is WeightQuant and isinstance(WeightQuant, type)
    assert lowbit.quantize is lowbit.api.quantize and lowbit.load is lowbit.api.load and lowbit.save is lowbit.api.save
    assert lowbit.GPTQ is lowbit.recipe.GPTQ and lowbit.Recipe is lowbit.recipe.Recipe and RTN is lowbit.recipe.RTN
    assert set(lowbit.__all__) <= set(dir(lowbit))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lowbit.no_such_name  # noqa: B018


def test_every_name_the_cli_accepts_builds_its_recipe_and_no_other():
    """The names checked without torch while options are parsed (preset_names.py) are exactly the ones presets.py
    builds recipes for, each named as asked; the CLI's dtype names are torch's dtypes."""
    import torch

    from lowbit import presets
    from lowbit.cli.common import DTYPES, torch_dtype
    from lowbit.preset_names import check_recipe_name

    assert [torch_dtype(n) for n in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    valid = [*presets.preset_names(), "gptq-w4g64-actorder", "w3pc", "awq-gptq-w4g32", "w2g32", "awq-w3pc"]
    for name in valid:
        assert check_recipe_name(name) == name and presets.resolve_recipe(name).name == name
    for name in ("awq-w4g64-actorder", "gptq-w9g64", "w4g0", "w4", "gptq-actorder-w4g128", "W8", "nothing"):
        with pytest.raises(LowbitError, match=f"^unknown recipe '{name}'"):
            check_recipe_name(name)


def test_recipes_lists_every_preset_and_prints_one(capsys):
    from lowbit.presets import preset_names, resolve_recipe

    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in preset_names())
    assert main(["recipes", "gptq-w4g128"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(resolve_recipe("gptq-w4g128").to_json())
