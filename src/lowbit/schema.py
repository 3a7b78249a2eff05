"""Typed checks for what lowbit reads: recipes, lowbit_config.json, quant_report.json, results.json, CLI numbers.

One mechanism instead of a check per field: a value is checked against a type annotation (int, float, bool, str,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, a dataclass or a TypedDict), and a record against
the annotations of the class that describes it. So a wrong type is refused by the field's own declaration before
any range rule compares it, and a new field is checked the day it is declared. Expected types are named in JSON's
words (an integer, true or false, null): a JSON file is what a user edits when a check fails.

Two modes: ``check_fields`` checks a Python object (a nested dataclass must be an instance, which checked itself);
``check_record`` checks decoded JSON (a nested dataclass or TypedDict must be an object of its fields). A dataclass
record refuses unknown keys (its constructor would); a TypedDict describes only the keys lowbit reads from a file
that may hold more.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

# longest first: a UTF-32 LE BOM starts with the UTF-16 LE one
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
_NAMES: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
    str: ("a string", "strings"), type(None): ("null", "nulls"), Any: ("any value", "values"),
}


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8 (a leading BOM tolerated), or UTF-16/32 when it starts with that BOM: Windows
    PowerShell's ``>`` writes UTF-16, so ``lowbit recipes NAME > r.json`` there must still give a readable recipe."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LowbitError(f"cannot read {what} {path}: {exc.strerror}") from None
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise LowbitError(
            f"{what} {path} is not {encoding.removesuffix('-sig').upper()} text (byte {data[exc.start]:#04x} at "
            f"offset {exc.start}); save it as UTF-8"
        ) from None


def read_json(path: Path, what: str, fix: str) -> Any:
    """Decoded JSON of a file, or one line saying why it is not JSON (empty, not UTF-8, malformed)."""
    text = read_text(path, what)
    if not text.strip():
        raise LowbitError(f"{what} {path} is empty; {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits; nesting deeper than the stack
        raise LowbitError(f"{what} {path} is not valid JSON ({str(exc)[:80]}); {fix}") from None


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: ``low`` and ``high`` inclusive, except ``low`` itself when ``open_low``
    (``Range(0, open_low=True)`` is > 0). NaN and infinities are never in a range."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        if self.low is None:
            return f"<= {self.high}"
        return f"in ({self.low}, {self.high}]" if self.open_low else f"in {self.low}..{self.high}"


def check_range(value: float, allowed: Range, root: str, fix: str) -> None:
    if value not in allowed:
        raise LowbitError(f"{root} must be {allowed}, got {_show(value)}; {fix}")


def check_fields(obj: Any, root: str, fix: str) -> None:
    """Every field of dataclass instance ``obj`` against its annotated type (for ``__post_init__``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _check(getattr(obj, f.name), hints[f.name], root, fix, f.name, from_json=False)


def check_record(data: Any, cls: type, root: str, fix: str, path: str = "") -> None:
    """Decoded JSON ``data`` against dataclass or TypedDict ``cls``: an object, its required keys present, every
    key it declares of the declared type; unknown keys are refused for a dataclass."""
    _check(data, cls, root, fix, path, from_json=True)


def check_value(value: Any, annotation: Any, root: str, fix: str, path: str = "") -> None:
    """Decoded JSON ``value`` against ``annotation``, e.g. ``list[dict[str, Any]]`` (a bare ``dict``: any object)."""
    _check(value, annotation, root, fix, path, from_json=True)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_record(annotation: Any) -> bool:
    return isinstance(annotation, type) and (dataclasses.is_dataclass(annotation) or typing.is_typeddict(annotation))


def _members(annotation: Any) -> tuple[Any, ...] | None:
    """The members of a union (``X | None``), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _fits(value: Any, annotation: Any, from_json: bool) -> bool:
    """Whether ``value`` has the outer shape ``annotation`` asks for (containers' items are checked after)."""
    members = _members(annotation)
    if members is not None:
        return any(_fits(value, m, from_json) for m in members)
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool or annotation is str:
        return isinstance(value, annotation)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if _is_record(annotation):
        return isinstance(value, dict) if from_json else isinstance(value, annotation)
    raise TypeError(f"schema: no check for annotation {annotation!r}")  # a programming error, not bad input


def _expected(annotation: Any, from_json: bool, plural: bool = False) -> str:
    members = _members(annotation)
    if members is not None:
        return " or ".join(_expected(m, from_json, plural) for m in members)
    if typing.get_origin(annotation) in (list, tuple):
        return "lists" if plural else f"a list of {_expected(typing.get_args(annotation)[0], from_json, plural=True)}"
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    if _is_record(annotation) and not from_json:
        return f"{annotation.__name__} objects" if plural else f"a {annotation.__name__}"
    return "objects" if plural else "an object"


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(root: str, path: str) -> str:
    return f"{root}: {path}" if path else root


def _check(value: Any, annotation: Any, root: str, fix: str, path: str, from_json: bool) -> None:
    if not _fits(value, annotation, from_json):
        raise LowbitError(f"{_where(root, path)} must be {_expected(annotation, from_json)}, got {_show(value)}; {fix}")
    members = _members(annotation)
    if members is not None:  # recurse into the member that fits, for a precise message about its contents
        _check(value, next(m for m in members if _fits(value, m, from_json)), root, fix, path, from_json)
    elif typing.get_origin(annotation) in (list, tuple):
        for i, item in enumerate(value):
            _check(item, typing.get_args(annotation)[0], root, fix, f"{path}[{i}]", from_json)
    elif typing.get_origin(annotation) is dict:
        for key, item in value.items():
            _check(item, typing.get_args(annotation)[1], root, fix, f"{path}[{key!r}]" if path else str(key), from_json)
    elif _is_record(annotation) and from_json:
        _check_keys(value, annotation, root, fix, path)


def _check_keys(data: dict[str, Any], cls: type, root: str, fix: str, path: str) -> None:
    hints = _hints(cls)
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        declared = [f.name for f in fields]
        missing_default = dataclasses.MISSING
        required = {f.name for f in fields if f.default is missing_default and f.default_factory is missing_default}
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise LowbitError(f"{_where(root, path)} has unknown keys {unknown}; known: {declared}; {fix}")
    else:
        declared, required = list(hints), set(cls.__required_keys__)
    missing = sorted(required - set(data))
    if missing:
        raise LowbitError(f"{_where(root, path)} lacks {missing}; {fix}")
    for key in declared:
        if key in data:
            _check(data[key], hints[key], root, fix, f"{path}.{key}" if path else key, from_json=True)
