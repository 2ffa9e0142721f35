"""LoRA <-> flat float32 vector, exactly inverse, in layout order (per module: A then B)."""

from __future__ import annotations

import numpy as np

from w2w.errors import LayoutMismatchError
from w2w.layout import Layout
from w2w.lora import LoRA, LoRALayer


def flatten(lora: LoRA, layout: Layout | None = None) -> np.ndarray:
    """The model's vector, (D,) float32. With `layout`, the LoRA must have exactly that layout."""
    if layout is not None and lora.layout() != layout:
        raise LayoutMismatchError(
            f"LoRA layout {lora.layout().fingerprint} differs from the expected {layout.fingerprint}"
        )
    parts = []
    for l in lora.layers.values():
        parts.append(l.A.reshape(-1))
        parts.append(l.B.reshape(-1))
    return np.concatenate(parts).astype(np.float32, copy=False)  # (D,)


def unflatten(vector: np.ndarray, layout: Layout, base_model: str | None = None) -> LoRA:
    """The LoRA whose flat vector is `vector`. Copies, so the result does not alias a memory map."""
    vector = np.asarray(vector)
    if vector.shape != (layout.dim,):
        raise LayoutMismatchError(f"vector of shape {vector.shape} does not fit layout of D={layout.dim}")
    layers = {}
    for e, start in zip(layout.entries, layout.offsets, strict=True):
        mid = start + e.a_size
        A = np.array(vector[start:mid], dtype=np.float32).reshape(e.a_shape)
        B = np.array(vector[mid : start + e.size], dtype=np.float32).reshape(e.b_shape)
        layers[e.module] = LoRALayer(A, B, e.alpha)
    return LoRA(layers, base_model)
