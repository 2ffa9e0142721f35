"""The canonical in-memory LoRA: module path -> (A [r, in], B [out, r], alpha), float32 numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from w2w.layout import Layout, LayoutEntry, canonical_sort


@dataclass
class LoRALayer:
    """One adapted module. The weight update is (alpha / rank) * B @ A.

    A is (r, in) for a Linear and (r, in, kh, kw) for a conv; B is (out, r) or (out, r, 1, 1).
    """

    A: np.ndarray
    B: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def a2d(self) -> np.ndarray:
        return self.A.reshape(self.rank, -1)  # (r, in*kh*kw)

    def b2d(self) -> np.ndarray:
        return self.B.reshape(self.B.shape[0], self.rank)  # (out, r)

    def delta(self) -> np.ndarray:
        """The dense weight update, (out, in*kh*kw). For tests and small layers only."""
        return self.scale * (self.b2d() @ self.a2d())


@dataclass
class LoRA:
    """A LoRA in canonical form. `layers` is kept in the canonical (w2w) order; module names are diffusers'
    UNet paths and `text_encoder[_2].<transformers path>` (w2w/formats/names.py).

    `meta` holds what the file said: its safetensors header metadata (`ss_*`, `modelspec.*`, ...), and from the
    readers `source_dtype` (float32/float16/bfloat16) and `source_kind` (lora/locon/loha/lokr)."""

    layers: dict[str, LoRALayer]
    base_model: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {k: self.layers[k] for k in canonical_sort(self.layers)}

    def layout(self) -> Layout:
        return Layout(
            tuple(
                LayoutEntry(name, tuple(l.A.shape), tuple(l.B.shape), float(l.alpha)) for name, l in self.layers.items()
            )
        )

    @property
    def num_params(self) -> int:
        return sum(l.A.size + l.B.size for l in self.layers.values())

    def scaled(self, factor: float) -> LoRA:
        """The same LoRA with every update multiplied by `factor` (applied to B)."""
        return LoRA(
            {k: LoRALayer(l.A.copy(), (l.B * factor).astype(np.float32), l.alpha) for k, l in self.layers.items()},
            self.base_model,
            dict(self.meta),
        )


def check_lora(lora: LoRA, path: object) -> None:
    """Raise ShapeError/NonFiniteError for factors that cannot be a LoRA."""
    from w2w.errors import NonFiniteError, ShapeError

    if not lora.layers:
        raise ShapeError(path, "holds no LoRA layers")
    for name, l in lora.layers.items():
        if l.A.ndim not in (2, 4) or l.B.ndim != l.A.ndim:
            raise ShapeError(path, f"{name}: A {tuple(l.A.shape)} and B {tuple(l.B.shape)} are not LoRA factors")
        if l.B.shape[1] != l.A.shape[0]:
            raise ShapeError(path, f"{name}: rank of A {tuple(l.A.shape)} disagrees with B {tuple(l.B.shape)}")
        if l.A.ndim == 4 and tuple(l.B.shape[2:]) != (1, 1):
            raise ShapeError(path, f"{name}: conv B must be (out, r, 1, 1), got {tuple(l.B.shape)}")
        if l.rank == 0 or 0 in l.A.shape or 0 in l.B.shape:
            raise ShapeError(path, f"{name}: empty factor A {tuple(l.A.shape)} / B {tuple(l.B.shape)}")
        if not math.isfinite(l.alpha) or l.alpha == 0:
            raise ShapeError(path, f"{name}: alpha {l.alpha} is not a usable LoRA alpha")
        for which, t in (("A", l.A), ("B", l.B)):
            if not np.isfinite(t).all():
                raise NonFiniteError(path, f"{name}.{which} holds NaN or Inf values")
