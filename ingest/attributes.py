"""Attribute input: `--attr KEY=VALUE` pairs and `--attrs-csv` tables (model name, then attributes)."""

from __future__ import annotations

import csv
from pathlib import Path

from w2w.errors import AttributeInputError

_TRUE = {"true", "yes", "y", "t"}
_FALSE = {"false", "no", "n", "f"}


def parse_value(text: str, where: str) -> float | bool:
    """'true'/'false' (and yes/no) are booleans; anything else must be a number."""
    t = text.strip()
    if t.lower() in _TRUE:
        return True
    if t.lower() in _FALSE:
        return False
    try:
        value = float(t)
    except ValueError:
        raise AttributeInputError(f"{where}: {text!r} is not a number or a boolean (true/false)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise AttributeInputError(f"{where}: {text!r} is not a finite number")
    return value


def parse_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, float | bool]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AttributeInputError(f"--attr {pair!r}: expected KEY=VALUE, e.g. --attr beard=true")
        out[key.strip()] = parse_value(value, f"--attr {pair}")
    return out


def read_csv(path: Path, known_kinds: dict[str, str] | None = None) -> dict[str, dict[str, float | bool]]:
    """{model name: {attribute: value}}. Empty cells mean 'unknown' and are left out.

    A column whose values are all 0/1 is read as booleans, so `--where "beard"` works on it, unless the
    registry already holds that attribute as numbers (`known_kinds`): a column keeps its registry kind.
    """
    known_kinds = known_kinds or {}
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise AttributeInputError(f"{path}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise AttributeInputError(f"{path}: is not a readable CSV file ({e})") from None
    if not rows or len(rows[0]) < 2:
        raise AttributeInputError(f"{path}: needs a header row: model name, then one column per attribute")
    header = [h.strip() for h in rows[0]]
    dupes = sorted({h for h in header[1:] if header[1:].count(h) > 1})
    if dupes or not all(header[1:]):
        what = f"repeats the column {dupes[0]!r}" if dupes else "has an empty column name"
        raise AttributeInputError(f"{path}: the header {what}; every attribute needs one column of its own")
    table: dict[str, dict] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise AttributeInputError(f"{path}, line {lineno}: {len(row)} cells, the header has {len(header)}")
        name = row[0].strip()
        if name in table:
            raise AttributeInputError(f"{path}, line {lineno}: model {name!r} appears twice")
        table[name] = {
            key: parse_value(cell, f"{path}, line {lineno}, column {key}")
            for key, cell in zip(header[1:], row[1:], strict=True)
            if cell.strip()
        }
    for key in header[1:]:
        values = [attrs[key] for attrs in table.values() if key in attrs]
        kind = known_kinds.get(key)
        if values and all(isinstance(v, bool) or v in (0.0, 1.0) for v in values) and kind != "number":
            for attrs in table.values():
                if key in attrs:
                    attrs[key] = bool(attrs[key])
        elif kind == "number":
            for attrs in table.values():
                if key in attrs:
                    attrs[key] = float(attrs[key])
    return table
