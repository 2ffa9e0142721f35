"""Linear combinations of LoRAs of one family with different ranks, alphas and targets, exact in dW.

sum_i c_i s_i B_i A_i = [c_1 s_1 B_1, ..., c_n s_n B_n] [A_1; ...; A_n] per module: the result's factors
are the concatenations (rank = sum of the ranks; each alpha folded into B, so the result's alpha equals
its rank and its scale is 1). This is PEFT's add_weighted_adapter "cat". `truncate` then gives the best
rank-R approximation per module (PEFT's "svd"), computed from the factors (QR of each, an SVD of the
small core), never from the dense dW, with the error it makes. `shared_frame` writes a LoRA with A = I, so
that its flattened vector is linear in dW.
"""

from __future__ import annotations

import numpy as np

from w2w.errors import LayoutMismatchError
from w2w.lora import LoRA, LoRALayer


def concat(terms: list[tuple[float, LoRA]], base_model: str | None = None) -> LoRA:
    """The LoRA whose dW is sum_i c_i dW_i exactly, modules absent from a term contributing nothing."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, tuple]]] = {}
    for coef, lora in terms:
        for name, l in lora.layers.items():
            B = (l.b2d().astype(np.float64) * (coef * l.scale)).astype(np.float32)
            parts.setdefault(name, []).append((B, l.a2d(), tuple(l.A.shape[1:])))
    layers = {}
    for name, items in parts.items():
        shapes = {(b.shape[0], tail) for b, _, tail in items}
        if len(shapes) != 1:
            raise LayoutMismatchError(f"module {name} has different shapes in the mixed models: {sorted(shapes)}")
        out, tail = shapes.pop()
        B = np.concatenate([b for b, _, _ in items], axis=1)  # (out, sum r)
        A = np.concatenate([a for _, a, _ in items], axis=0)  # (sum r, in')
        layers[name] = _layer(B, A, out, tail)
    return LoRA(layers, base_model)


def _layer(B: np.ndarray, A: np.ndarray, out: int, tail: tuple) -> LoRALayer:
    r = A.shape[0]
    A = A.reshape((r, *tail)).astype(np.float32)
    B = B.reshape((out, r) + ((1, 1) if len(tail) == 3 else ())).astype(np.float32)
    return LoRALayer(A, B, float(r))  # alpha = rank: scale 1, the scales are in B


def truncate(lora: LoRA, rank: int) -> tuple[LoRA, float]:
    """(best rank-`rank` approximation per module, relative Frobenius error ||dW - dW_R|| / ||dW||).

    Per module dW = s B A = Q_B (R_B R_A^T) Q_A^T (thin QRs of B and A^T); the SVD of the small core
    R_B R_A^T = U S V^T gives dW's singular values S and vectors Q_B U, Q_A V, so the truncation is exact
    (Eckart-Young) and its error is the discarded singular values.
    """
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    layers, kept_sq, lost_sq = {}, 0.0, 0.0
    for name, l in lora.layers.items():
        B = l.b2d().astype(np.float64) * l.scale  # (out, r)
        A = l.a2d().astype(np.float64)  # (r, in')
        qb, rb = np.linalg.qr(B)  # (out, r), (r, r)
        qa, ra = np.linalg.qr(A.T)  # (in', r), (r, r)
        u, sv, vt = np.linalg.svd(rb @ ra.T)
        k = min(rank, len(sv))
        kept_sq += float(np.sum(sv[:k] ** 2))
        lost_sq += float(np.sum(sv[k:] ** 2))
        root = np.sqrt(sv[:k])  # split the singular values evenly between the factors
        new_b = (qb @ u[:, :k]) * root  # (out, k)
        new_a = (root[:, None] * vt[:k]) @ qa.T  # (k, in')
        layers[name] = _layer(new_b, new_a, B.shape[0], tuple(l.A.shape[1:]))
    total = kept_sq + lost_sq
    return LoRA(layers, lora.base_model, dict(lora.meta)), float(np.sqrt(lost_sq / total)) if total > 0 else 0.0


def shared_frame(lora: LoRA) -> LoRA:
    """The same weight updates written with A = I (rank = in_features, alpha = rank: scale 1) and B = dW.

    Every LoRA of a family written so shares its A, so its flattened vector is (the constant A and) dW itself:
    means, differences and Gaussian draws of such vectors are those of the weight updates. Trained rank-r
    factors are not (B A is bilinear, and A moves away from its initialisation in training), which is why
    the w2w space of the toy world is fitted on this frame (README, "Why edits and samples failed in the toy world").
    """
    layers = {}
    for name, l in lora.layers.items():
        dW = l.delta()  # (out, in')
        tail = tuple(l.A.shape[1:])
        layers[name] = _layer(dW, np.eye(dW.shape[1], dtype=np.float32), dW.shape[0], tail)
    return LoRA(layers, lora.base_model, dict(lora.meta))
