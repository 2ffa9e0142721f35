"""Output shared by every command: --json, and plain tables for people."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text.")


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.6g}"
    if isinstance(c, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in c.items())
    return str(c)
