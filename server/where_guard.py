"""The `where` filters the server takes from anyone: a condition over one model's own columns, nothing else.

The registry runs `where` as SQL (for its own user, on the command line). Over HTTP that would let a caller
read other rows through subqueries or error messages (a private model's name in "could not convert ..."),
or files through DuckDB's readers. So the server accepts only: column names (attributes, id, name, kind,
...), numbers, 'strings', comparison and arithmetic operators, parentheses, commas, and AND OR NOT IN IS
NULL TRUE FALSE BETWEEN LIKE ILIKE. No function calls, casts, comments or anything else.
"""

from __future__ import annotations

import re

from registry.catalog import RESERVED_COLUMNS
from w2w.errors import FilterError

KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false", "between", "like", "ilike"}
TOKEN = re.compile(
    r"""\s+
    |(?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
    |(?P<string>'(?:[^']|'')*')
    |(?P<quoted>"(?:[^"]|"")+")
    |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op><>|!=|<=|>=|[=<>+*/%(),-])""",
    re.X,
)


def check_where(where: str | None, attribute_keys) -> str | None:
    """`where` itself when it is such a condition; a FilterError (a 400) naming what is not allowed."""
    if where is None or not where.strip():
        return None
    columns = {c.lower() for c in (*RESERVED_COLUMNS, *attribute_keys)}
    pos, previous = 0, None
    while pos < len(where):
        m = TOKEN.match(where, pos)
        if m is None:
            raise FilterError(f"where: {where[pos : pos + 10]!r} is not allowed in a filter (at {pos})")
        kind, text, pos = m.lastgroup, m.group(), m.end()
        if kind == "op" and text in "-/" and where.startswith("-" if text == "-" else "*", pos):
            raise FilterError("where: comments ('--', '/*') are not allowed in a filter")
        if kind == "op" and text == "(" and previous == "column":
            raise FilterError("where: function calls are not allowed in a filter")
        if kind == "word" and text.lower() not in KEYWORDS | columns:
            raise FilterError(f"where: unknown column {text!r}; columns: {', '.join(sorted(columns))}")
        if kind == "quoted" and text[1:-1].replace('""', '"').lower() not in columns:
            raise FilterError(f"where: unknown column {text}")
        if kind is not None:
            previous = "column" if kind == "quoted" or (kind == "word" and text.lower() in columns) else kind
    return where
