"""Layouts: the ordered list of LoRA'd modules and factor shapes that turns a LoRA into a vector.

The canonical order is the w2w one (w2w-method.md): down blocks, mid block, up blocks; within a
transformer block attn1 before attn2; to_q, to_k, to_v, to_out; and per module A before B. The
layout (module, shapes, alpha) fixes a weight space: vectors are only comparable within one layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

# Names whose registration order in diffusers differs from alphabetical order.
_PRIORITY = {
    "conv_in": 0,
    "time_proj": 1,
    "time_embedding": 2,
    "class_embedding": 3,
    "add_embedding": 4,
    "down_blocks": 10,
    "mid_block": 11,
    "up_blocks": 12,
    "conv_norm_out": 13,
    "conv_out": 14,
    "to_q": 0,
    "to_k": 1,
    "to_v": 2,
    "to_out": 3,
}
_DIGITS = re.compile(r"^\d+$")


def _token_key(tok: str) -> tuple[int, int, str]:
    if _DIGITS.match(tok):
        return (0, int(tok), "")
    return (1, _PRIORITY.get(tok, 50), tok)


def module_sort_key(module: str) -> tuple:
    return tuple(_token_key(t) for t in module.split("."))


def canonical_sort(modules: Iterable[str]) -> list[str]:
    """Module paths in the canonical (w2w) order."""
    return sorted(modules, key=module_sort_key)


@dataclass(frozen=True)
class LayoutEntry:
    module: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    alpha: float

    @property
    def a_size(self) -> int:
        return math.prod(self.a_shape)

    @property
    def size(self) -> int:
        return self.a_size + math.prod(self.b_shape)

    @property
    def rank(self) -> int:
        return self.a_shape[0]


@dataclass(frozen=True)
class Layout:
    """An ordered tuple of entries; D = sum of factor sizes."""

    entries: tuple[LayoutEntry, ...]

    def __post_init__(self) -> None:
        names = [e.module for e in self.entries]
        assert names == canonical_sort(names), "layout entries must be in canonical order"

    @cached_property
    def dim(self) -> int:
        return sum(e.size for e in self.entries)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each entry's A in the flat vector (B follows A)."""
        out, pos = [], 0
        for e in self.entries:
            out.append(pos)
            pos += e.size
        return tuple(out)

    @cached_property
    def fingerprint(self) -> str:
        """Stable 16-hex id of (modules, shapes, alphas, order)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.entries)

    def to_json(self) -> str:
        return json.dumps(
            [[e.module, list(e.a_shape), list(e.b_shape), e.alpha] for e in self.entries],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        return cls(tuple(LayoutEntry(m, tuple(a), tuple(b), float(al)) for m, a, b, al in json.loads(text)))

    def describe(self) -> str:
        ranks = sorted({e.rank for e in self.entries})
        alphas = sorted({e.alpha for e in self.entries})
        return (
            f"{len(self.entries)} modules, D={self.dim:,}, rank {'/'.join(map(str, ranks))}, "
            f"alpha {'/'.join(f'{a:g}' for a in alphas)}"
        )
