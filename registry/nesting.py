"""Bounds on nested data from outside (JSON bodies, YAML model cards): deep nesting makes Python's
recursive parsers and printers raise RecursionError, and YAML aliases can make a small file a huge tree."""

from __future__ import annotations

import json

from w2w.errors import W2WError

MAX_DEPTH = 64  # model cards and commit lines are a few levels deep
MAX_NODES = 200_000


class NestingError(W2WError, ValueError):
    pass


def bounded(obj: object, what: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> object:
    """`obj` itself when its lists and mappings nest at most `max_depth` deep and hold at most `max_nodes`
    values (shared ones counted each time they appear); a NestingError otherwise. Iterative."""
    stack, seen = [(obj, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > max_nodes:
            raise NestingError(f"{what}: more than {max_nodes} values")
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set)):
            children = list(value)
        else:
            continue
        if children and depth >= max_depth:
            raise NestingError(f"{what}: nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)
    return obj


def loads_json(data: str | bytes, what: str) -> object:
    """json.loads with bounded nesting: a ValueError (NestingError or JSONDecodeError), never RecursionError."""
    try:
        return bounded(json.loads(data), what)
    except RecursionError:
        raise NestingError(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
