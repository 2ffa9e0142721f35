"""Exact nearest neighbours over a space's full vectors, scanned by FAISS straight from the vector store.

The flat "index" of a space is its vector store: FAISS's exact kernels (`knn_L2sqr` with an
`IDSelectorBatch` for filters, `fvec_inner_products_by_idx` for cosine) run on the memory-mapped
shards, so the N x D matrix is never copied into memory. A filter is the set of allowed rows, given
to FAISS as an ID selector before any distance is computed: the answer is always the k best among the
models that match (never fewer, unless fewer match).

Distances: `l2` (Euclidean), `cosine` (1 - cos), `delta` (sum over layers of ||dW1 - dW2||_F, see
w2w.distance). The best candidates are re-ranked with distances computed directly in float64, so
near-ties order exactly as a brute-force scan would.

After a fit, `rerank` computes the exact distances of a few candidates (from the coefficient index) on
their full vectors, read through a `MappedStore` (every shard mapped once and kept).
"""

from __future__ import annotations

import mmap
import os
import time

import faiss
import numpy as np
from faiss import swig_ptr

from registry.vectors import VectorStore
from w2w.distance import delta_distances
from w2w.layout import Layout

METRICS = ("l2", "cosine", "delta")
DELTA_BLOCK_ROWS = 256
RERANK_RTOL = 1e-4  # float32 kernel distances are within this of the truth (their error is ~1e-6)
# rerank's MADV_WILLNEED of the candidate rows, so that the disk reads of rows not in the page cache overlap
# instead of coming one page fault at a time. "auto": read rows one by one, and prefetch all that are left
# as soon as one takes longer than PREFETCH_AFTER_S (it came from disk); True: always, first; False: never.
# At N = 65,000 (26 GB, more than RAM) with the store evicted, p50 per query: auto 31 ms, True 24 ms,
# False 176 ms; with the rows cached, True costs ~0.2-0.5 ms more than the others (bench_search_fitted.py).
PREFETCH: bool | str = "auto"
PREFETCH_AFTER_S = 1e-3


def _direct(X: np.ndarray, q: np.ndarray, metric: str, layout: Layout) -> np.ndarray:
    if metric == "delta":
        return delta_distances(q, X, layout)
    X64, q64 = X.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        return np.sqrt(((X64 - q64) ** 2).sum(axis=1))
    nx, nq = np.linalg.norm(X64, axis=1), np.linalg.norm(q64)
    return 1.0 - (X64 @ q64) / np.maximum(nx * nq, 1e-30)


def _shard_candidates(
    mm: np.ndarray, local: np.ndarray, whole: bool, q: np.ndarray, kk: int, metric: str, layout: Layout, sq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(local rows, approximate distances) of up to kk candidates in one memory-mapped shard (n, D)."""
    n, d = mm.shape
    if metric == "l2":
        dist, idx = np.empty(kk, np.float32), np.empty(kk, np.int64)
        sel = None if whole else faiss.IDSelectorBatch(len(local), swig_ptr(local))
        faiss.knn_L2sqr(swig_ptr(q), swig_ptr(mm), d, 1, n, kk, swig_ptr(dist), swig_ptr(idx), None, sel)
        ok = idx >= 0
        return idx[ok], dist[ok].astype(np.float64)
    if metric == "cosine":
        ip = np.empty(len(local), np.float32)
        faiss.fvec_inner_products_by_idx(swig_ptr(ip), swig_ptr(q), swig_ptr(mm), swig_ptr(local), d, 1, len(local))
        qq = float(np.add.reduce(q * q, dtype=np.float64))
        dist = 1.0 - ip.astype(np.float64) / np.maximum(np.sqrt(sq * qq), 1e-30)
    else:
        dist = np.concatenate(
            [
                delta_distances(q, mm[local[lo : lo + DELTA_BLOCK_ROWS]], layout)
                for lo in range(0, len(local), DELTA_BLOCK_ROWS)
            ]
        )
    if len(dist) > kk:
        # keep the kk best and everything within the kernel's error of the kk-th (near-duplicates)
        cut = np.partition(dist, kk - 1)[kk - 1] + abs_tol(metric, d)
        top = np.flatnonzero(dist <= cut)
        return local[top], dist[top]
    return local, dist


def abs_tol(metric: str, dim: int) -> float:
    """How far a float32 kernel's distance may be from the truth, in absolute terms (0 when exact).

    A float32 dot product of D terms errs by about eps32 * sqrt(D) of |x||q|: for 1 - cos that is an
    absolute error, which matters between near-duplicates whose distances are ~1e-6 apart.
    """
    return 8 * float(np.finfo(np.float32).eps) * np.sqrt(dim) if metric == "cosine" else 0.0


def knn(
    store: VectorStore,
    q: np.ndarray,
    k: int,
    metric: str,
    layout: Layout,
    rows: np.ndarray,
    sq_norms: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows among `rows` (sorted) closest to q -> (rows (k',), distances (k',)), nearest first.

    `sq_norms[i]` is the squared norm of row `rows[i]`.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    k = min(k, len(rows))
    if k == 0:
        return np.empty(0, np.int64), np.empty(0)
    kk = k if metric == "delta" else min(len(rows), 2 * k + 8)  # candidates kept from each shard
    cand_r, cand_d = [], []
    shards = rows // store.rows_per_shard
    bounds = np.flatnonzero(np.diff(shards)) + 1
    for part, sq in zip(np.split(rows, bounds), np.split(sq_norms, bounds), strict=True):
        shard = int(part[0] // store.rows_per_shard)
        local = np.ascontiguousarray(part - shard * store.rows_per_shard)
        n = int(local[-1]) + 1
        whole = len(local) == n  # every row of the mapped range is allowed: no selector needed
        found, dist = _shard_candidates(store.map(shard, n), local, whole, q, min(kk, len(local)), metric, layout, sq)
        cand_r.append(found + shard * store.rows_per_shard)
        cand_d.append(dist)
    best_r, best_d = np.concatenate(cand_r), np.concatenate(cand_d)
    if metric == "delta":  # computed in float64 from the start
        order = np.lexsort((best_r, best_d))[:k]
        return best_r[order], best_d[order]
    if metric == "l2":
        best_d = np.sqrt(np.maximum(best_d, 0.0))  # the kernel gives squared distances
    order = np.lexsort((best_r, best_d))
    best_r, best_d = best_r[order], best_d[order]
    # The float32 kernels may misorder candidates closer than their rounding error. Recompute in float64
    # the k returned and every candidate that close to the k-th (it decides who is in), then re-sort.
    tol = RERANK_RTOL * max(float(best_d[min(k, len(best_d)) - 1]), 1e-30) + abs_tol(metric, store.dim)
    exact = np.arange(len(best_d)) < k
    exact |= best_d <= best_d[min(k, len(best_d)) - 1] + tol
    idx = np.flatnonzero(exact)
    best_r, best_d = best_r[idx], _direct(store.read(best_r[idx]), q, metric, layout)
    order = np.lexsort((best_r, best_d))[:k]
    return best_r[order], best_d[order]


# --- the re-rank of a search after a fit ------------------------------------------------------------


class MappedStore:
    """A vector store read through read-only memory maps of its shards, made once and kept.

    A search after a fit reads a few dozen rows per query from anywhere in the store: mapping a shard per
    read (VectorStore.map) costs more than the row itself. Rows are views (no copy). Shards only grow
    (rows are appended; repairs rewrite rows in place, which a shared map sees), so a map is remade only
    when a row past its end is asked for.
    """

    def __init__(self, store: VectorStore):
        self.store = store
        self.maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def shard(self, shard: int, need_rows: int) -> tuple[mmap.mmap, np.ndarray]:
        hit = self.maps.get(shard)
        if hit is None or len(hit[1]) < need_rows:
            path = self.store.shard_path(shard)
            try:
                with open(path, "rb") as f:
                    n = os.fstat(f.fileno()).st_size // self.store.row_bytes
                    mm = mmap.mmap(f.fileno(), n * self.store.row_bytes, prot=mmap.PROT_READ) if n else None
            except FileNotFoundError:
                n, mm = 0, None
            if n < need_rows:
                from w2w.errors import IntegrityError

                raise IntegrityError(
                    f"{path} is missing or shorter than the catalog says ({need_rows} rows); run `w2wreg verify`"
                )
            hit = self.maps[shard] = (mm, np.frombuffer(mm, dtype="<f4").reshape(n, self.store.dim))
        return hit

    def row(self, row: int) -> np.ndarray:
        """Row `row` as a read-only (D,) view of the map."""
        shard, local = divmod(int(row), self.store.rows_per_shard)
        return self.shard(shard, local + 1)[1][local]

    def prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows now, all at once (MADV_WILLNEED): when they are not in the page
        cache, the disk reads overlap instead of coming one page fault at a time."""
        page = mmap.PAGESIZE
        for r in np.asarray(rows).tolist():
            shard, local = divmod(r, self.store.rows_per_shard)
            mm, _ = self.shard(shard, local + 1)
            start = local * self.store.row_bytes
            aligned = start - start % page
            mm.madvise(mmap.MADV_WILLNEED, aligned, start + self.store.row_bytes - aligned)

    def close(self) -> None:
        """Forget the maps (each is unmapped once no view of it is left)."""
        self.maps.clear()


def rerank(
    mapped: MappedStore, q: np.ndarray, k: int, rows: np.ndarray, prefetch: bool | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows among `rows` (any order) nearest q by exact l2 on the full vectors -> (rows, distances).

    Distances come from FAISS's float32 kernel (relative error ~1e-6, see RERANK_RTOL); rows whose
    distances lie within RERANK_RTOL of a neighbour's in the order (inside the k returned, or across the
    k-th) are recomputed in float64 and re-sorted, so the order is that of exact distances, as in knn.
    `prefetch`: True, False or "auto" (see PREFETCH, the default).
    """
    rows = np.asarray(rows, dtype=np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    if len(rows) == 0 or k <= 0:
        return np.empty(0, np.int64), np.empty(0)
    mode = PREFETCH if prefetch is None else prefetch
    if mode is True:
        mapped.prefetch(rows)
    qp, d = swig_ptr(q), mapped.store.dim
    d2 = np.empty(len(rows))  # (m,)
    watch = mode == "auto"
    for j, r in enumerate(rows.tolist()):
        t0 = time.perf_counter() if watch else 0.0
        d2[j] = faiss.fvec_L2sqr(qp, swig_ptr(mapped.row(r)), d)
        if watch and time.perf_counter() - t0 > PREFETCH_AFTER_S:
            mapped.prefetch(rows[j + 1 :])  # this row came from disk: ask for the others all at once
            watch = False
    dist = np.sqrt(np.maximum(d2, 0.0))
    order = np.lexsort((rows, dist))
    rows, dist = rows[order], dist[order]
    k = min(k, len(rows))
    tol = RERANK_RTOL * dist  # (m,)
    close = np.zeros(len(rows), dtype=bool)
    gaps = np.diff(dist) <= tol[1:]  # (m - 1,): row j+1 within the kernel's error of row j
    close[:-1] |= gaps
    close[1:] |= gaps
    # beyond the k-th, only rows close enough to it to be in can matter
    idx = np.flatnonzero(close[: max(k, int(np.searchsorted(dist, dist[k - 1] + tol[k - 1], "right")))])
    if len(idx):
        X = np.stack([mapped.row(r) for r in rows[idx].tolist()])  # (t, D)
        dist = dist.copy()
        dist[idx] = _direct(X, q, "l2", None)
        order = np.lexsort((rows, dist))
        rows, dist = rows[order], dist[order]
    return rows[:k], dist[:k]
