"""The factorization-invariant distance between two LoRAs of one layout: ||dW1 - dW2||_F over all layers.

dW = s * B @ A with s = alpha / r. It never builds dW: with Gram matrices of the factors,
  <s1 B1 A1, s2 B2 A2>_F = s1 s2 tr((B1^T B2)(A2 A1^T))      (r1 x r2 products only)
so a layer costs O((in + out) * r1 * r2) instead of O(in * out). The same distance across layouts (other
ranks, alphas, targets) is w2w.delta.distance; this one works on flat vectors of one layout in batches.
Two factorizations of the same update (B M, M^-1 A) are at distance 0, unlike in raw vector space.
"""

from __future__ import annotations

import numpy as np

from w2w.layout import Layout


def _split(X: np.ndarray, layout: Layout):
    """Yield (entry, A (n, r, in'), B (n, out, r)) views of a batch of vectors (n, D)."""
    n = X.shape[0]
    for e, start in zip(layout.entries, layout.offsets, strict=True):
        mid = start + e.a_size
        A = X[:, start:mid].reshape(n, e.rank, -1)
        B = X[:, mid : start + e.size].reshape(n, e.b_shape[0], e.rank)
        yield e, A, B


def delta_distances(q: np.ndarray, X: np.ndarray, layout: Layout) -> np.ndarray:
    """Distances from one vector q (D,) to each row of X (n, D), all in `layout`. -> (n,) float64."""
    X = np.asarray(X, dtype=np.float32)
    out = np.zeros(X.shape[0], dtype=np.float64)
    qparts = list(_split(np.asarray(q, dtype=np.float32)[None, :], layout))
    for (e, A, B), (_, qa, qb) in zip(_split(X, layout), qparts, strict=True):
        s = e.alpha / e.rank
        qa, qb = qa[0].astype(np.float64), qb[0].astype(np.float64)  # (r, in'), (out, r)
        A64, B64 = A.astype(np.float64), B.astype(np.float64)
        # Gram matrices: (n, r, r) each
        aa = np.einsum("nri,nsi->nrs", A64, A64)
        bb = np.einsum("nor,nos->nrs", B64, B64)
        aq = np.einsum("nri,si->nrs", A64, qa)  # A_x A_q^T
        bq = np.einsum("nor,os->nrs", B64, qb)  # B_x^T B_q
        qq = float(np.sum((qb.T @ qb) * (qa @ qa.T)))
        xx = np.einsum("nrs,nrs->n", bb, aa)
        xq = np.einsum("nrs,nrs->n", bq, aq)
        out += s * s * (xx + qq - 2.0 * xq)
    return np.sqrt(np.maximum(out, 0.0))
