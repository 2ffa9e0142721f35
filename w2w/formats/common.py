"""Shared pieces of the format readers: pairing factors into layers, and PEFT-style alpha patterns."""

from __future__ import annotations

import re

import numpy as np

from w2w.errors import ShapeError
from w2w.lora import LoRA, LoRALayer


class LayerParts:
    __slots__ = ("A", "B", "alpha")

    def __init__(self) -> None:
        self.A: np.ndarray | None = None
        self.B: np.ndarray | None = None
        self.alpha: float | None = None


def assemble(
    parts: dict[str, LayerParts],
    path: object,
    default_alpha: float | None = None,
    alpha_for: dict[str, float] | None = None,
    base_model: str | None = None,
) -> LoRA:
    """Build a LoRA from collected factors. Alpha: per-layer value, else `alpha_for`, else default, else rank."""
    layers = {}
    for module, p in parts.items():
        if p.A is None or p.B is None:
            missing = "down/A" if p.A is None else "up/B"
            raise ShapeError(path, f"{module}: has one LoRA factor but no {missing} factor")
        A, B = p.A, p.B
        if A.ndim == 1 or B.ndim == 1 or A.ndim != B.ndim or A.ndim not in (2, 4):
            raise ShapeError(path, f"{module}: A {tuple(A.shape)} and B {tuple(B.shape)} are not LoRA factors")
        if B.shape[1] != A.shape[0]:
            raise ShapeError(path, f"{module}: rank of A {tuple(A.shape)} disagrees with B {tuple(B.shape)}")
        alpha = p.alpha
        if alpha is None and alpha_for:
            alpha = alpha_for.get(module)
        if alpha is None:
            alpha = default_alpha if default_alpha is not None else float(A.shape[0])
        # alpha is kept at float32 precision, as kohya stores it, so every format round-trips exactly
        layers[module] = LoRALayer(A, B, float(np.float32(alpha)))
    return LoRA(layers, base_model)


def pattern_lookup(patterns: dict[str, float], module: str) -> float | None:
    """PEFT's rule: a pattern key matches a module whose path ends with it (regex, dot-separated)."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return float(value)
    return None


def split_default_and_pattern(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value, and a pattern for every module that differs from it."""
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    default = max(counts, key=lambda v: (counts[v], -v))
    return default, {m: v for m, v in values.items() if v != default}


def as_int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
