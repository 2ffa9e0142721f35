"""The FAISS index over one subspace's coefficients: candidates for search, re-ranked exactly afterwards.

Kinds (one file, written and read by FAISS):
  flat   IndexIDMap2 over IndexFlatL2, while the space holds fewer than HNSW_MIN models (exact);
  hnsw   from HNSW_MIN models, when the coordinates come in variance order (registry.wspace.index_transform
         puts them so): a two-stage index, IndexIDMap2 over IndexRefineFlat over an HNSW graph of the leading
         HNSW_DIMS coordinates only. A search walks the small graph for RESCORE_FACTOR x n candidates,
         rescores them on all k coordinates (the refine index holds them) and keeps the n best;
  hnsw (legacy)  IndexIDMap2 over IndexHNSWFlat of all k coordinates: indexes written before the ordered
         coordinates; still read and searched.
Ids are model ids. A filter is an ID selector (`selector`), or an exact scan of the filter's rows
(`search_rows` over `stored`). The vectors it holds are the coefficients in the coordinates the subspace's
index transform gives them (distances there are distances in weight space); a model's own are read back with
`reconstruct`.

Beside the index, its neighbour lists (`Lists`, `<id>.lists.safetensors`): for every row, the LIST_LEN rows
nearest it, exact, computed once per build by brute force. A search from a model of the registry takes its
candidates from its list, plus an exact scan of the rows added since the lists were made, instead of a
graph walk: the same candidates as an exact scan of the index, for the cost of a lookup.
Both are derived data: `repair` rebuilds them from the coefficient store and the subspace.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from faiss import swig_ptr

HNSW_MIN = 20_000
# The graph is built over the leading HNSW_DIMS coordinates: in 1,000 dimensions a walk costs ~1 ms per query
# at N = 65,000 (bench/bench_search_floor.py), over 256 a fraction of that, and rescoring the walk's
# candidates on all k coordinates puts back what the truncation loses (bench/bench_search_fitted.py).
HNSW_DIMS = 256
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 200
RESCORE_FACTOR = 10  # candidates from the graph per candidate returned (two-stage index)
LIST_LEN = 40  # neighbour-list length: candidates for k <= 20 (the re-rank takes 2k)
EF_MIN, EF_FACTOR = 96, 5  # efSearch for n results: legacy graph max(EF_MIN, EF_FACTOR n); two-stage: see _ef


def build(coeffs: np.ndarray, ids: np.ndarray, kind: str = "auto", ordered: bool = True) -> faiss.Index:
    """An index over coefficient rows (n, k) with model ids (n,).

    `ordered`: the coordinates come in decreasing variance (the two-stage graph keeps the leading ones);
    without it a large index is the legacy graph over all k coordinates.
    """
    k = coeffs.shape[1]
    if kind == "auto":
        kind = "hnsw" if len(coeffs) >= HNSW_MIN else "flat"
    if kind == "hnsw":
        m = min(k, HNSW_DIMS) if ordered else k
        graph = faiss.IndexHNSWFlat(m, HNSW_M)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if m < k:
            first = faiss.RemapDimensionsTransform(k, m, False)  # False: the first m coordinates
            inner = faiss.IndexRefineFlat(faiss.IndexPreTransform(first, graph))
        else:
            inner = graph
    elif kind == "flat":
        inner = faiss.IndexFlatL2(k)
    else:
        raise ValueError(f"unknown index kind {kind!r}; known: auto, flat, hnsw")
    index = faiss.IndexIDMap2(inner)
    if len(coeffs):
        index.add_with_ids(np.ascontiguousarray(coeffs, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(faiss.downcast_index(index).index)


def kind_of(index: faiss.Index) -> str:
    inner = _inner(index)
    return "hnsw" if isinstance(inner, (faiss.IndexHNSW, faiss.IndexRefine)) else "flat"


def two_stage(index: faiss.Index) -> bool:
    """Whether the index is a graph over leading coordinates plus a rescoring on all of them."""
    return isinstance(_inner(index), faiss.IndexRefine)


def save(index: faiss.Index, path: Path) -> None:
    """Atomically: a reader sees the old index or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


# --- neighbour lists ---------------------------------------------------------------------------------


class Lists:
    """The exact nearest rows of every row of an index (made by `neighbor_lists`), and the lookups a search
    needs: the row of a model id, and the rows added to the index after the lists were made."""

    def __init__(self, rows: np.ndarray, index: faiss.Index):
        self.rows = rows  # (n, L) int32: row i's nearest rows, nearest first, itself left out
        ids = _id_view(index)
        self.n = len(rows)  # the index rows the lists cover: 0..n-1
        self.ids = ids.copy()
        self._order = np.argsort(self.ids[: self.n], kind="stable")
        self.added = np.arange(self.n, len(ids), dtype=np.int64)  # rows added since: scanned exactly

    def row_of(self, model_id: int) -> int | None:
        """The row of a model the lists cover, or None."""
        pos = int(np.searchsorted(self.ids[: self.n], model_id, sorter=self._order))
        if pos < self.n and self.ids[self._order[pos]] == model_id:
            return int(self._order[pos])
        return None


def neighbor_lists(index: faiss.Index, length: int = LIST_LEN) -> np.ndarray:
    """(n, min(length, n - 1)) int32: for every row of the index, its nearest rows by the stored coordinates,
    nearest first, itself left out. Exact: FAISS's brute-force kNN (BLAS, all threads), n^2 k flops."""
    Y = stored(index)
    n = len(Y)
    L = min(length, n - 1)
    if L <= 0:
        return np.empty((n, 0), np.int32)
    _, found = faiss.knn(Y, Y, L + 1)  # (n, L + 1): each row's own is first, unless tied at distance 0
    own = found == np.arange(n)[:, None]
    own[~own.any(axis=1), L] = True  # not among them (more than L exact duplicates): drop the farthest
    return found[~own].reshape(n, L).astype(np.int32)


def lists_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name.removesuffix(".faiss") + ".lists.safetensors")


def _ids_digest(ids: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def save_lists(path: Path, rows: np.ndarray, index: faiss.Index, coords: str = "") -> None:
    """Atomically, with the digest of the model ids of the rows they cover and `coords`, the digest of the
    coordinates' transform (so lists of another build of the index, or of other coordinates, are never used)."""
    from safetensors.numpy import save as st_save

    from w2w.formats.tensorfile import atomic_write_bytes

    meta = {"ids": _ids_digest(_id_view(index)[: len(rows)]), "coords": coords}
    atomic_write_bytes(path, st_save({"rows": np.ascontiguousarray(rows, np.int32)}, metadata=meta))


def load_lists(path: Path, index: faiss.Index, coords: str = "") -> Lists | None:
    """The lists of this index, or None: none written, or written for other rows (an index rebuilt since) or
    other coordinates (see save_lists)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            rows, meta = f.get_tensor("rows"), f.metadata() or {}
    except (OSError, SafetensorError):  # none, or damaged: derived data, so no lists (verify says so)
        return None
    ids = _id_view(index)
    if len(rows) > len(ids) or meta.get("coords", "") != coords or meta.get("ids") != _ids_digest(ids[: len(rows)]):
        return None
    return Lists(rows, index)


def ids_of(index: faiss.Index) -> np.ndarray:
    """The model id of every row, in insertion order (a copy)."""
    return _id_view(index).copy()


def _id_view(index: faiss.Index) -> np.ndarray:
    """ids_of without the copy: valid only while the index lives and is not added to."""
    id_map = faiss.downcast_index(index).id_map
    if id_map.size() == 0:
        return np.empty(0, np.int64)
    return faiss.rev_swig_ptr(id_map.data(), id_map.size()).view(np.int64)


def rows_of(index: faiss.Index, model_ids: np.ndarray) -> np.ndarray:
    """The rows of the index holding these models, ascending."""
    return np.flatnonzero(np.isin(_id_view(index), np.asarray(model_ids, dtype=np.int64)))


def stored(index: faiss.Index) -> np.ndarray:
    """The indexed vectors (ntotal, d), in insertion order (ids_of gives their ids): a view, valid while the
    index lives."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexRefine):
        flat = faiss.downcast_index(inner.refine_index)
    elif isinstance(inner, faiss.IndexHNSW):
        flat = faiss.downcast_index(inner.storage)
    else:
        flat = inner
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def reconstruct(index: faiss.Index, model_id: int) -> np.ndarray | None:
    """The indexed vector of one model (d,), or None when the index does not hold it."""
    try:
        return index.reconstruct(int(model_id))
    except RuntimeError:  # IndexIDMap2: "key not found"
        return None


@contextmanager
def single_thread() -> Iterator[None]:
    """FAISS calls on this thread without OpenMP threads: for one query, waking a team of threads on a busy
    2-core machine took ~11 ms per call, the search itself 0.1 ms (the setting is per thread: others keep
    theirs)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def selector(index: faiss.Index, allowed: np.ndarray) -> faiss.IDSelector:
    """An ID selector for a set of model ids, in the terms `search` passes it to this index (it copies what
    it needs: build it once per filter and reuse it while the index is unchanged)."""
    if two_stage(index):  # the graph is searched below the id map: it selects rows, not model ids
        allowed = rows_of(index, allowed)
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    return faiss.IDSelectorBatch(len(allowed), swig_ptr(allowed))


def _ef(n_candidates: int) -> int:
    return max(EF_MIN, n_candidates + n_candidates // 20)


def search(
    index: faiss.Index,
    q: np.ndarray,
    n: int,
    allowed: np.ndarray | None = None,
    ef: int | None = None,
    sel: faiss.IDSelector | None = None,
    rescore: int | None = None,
) -> np.ndarray:
    """Ids of up to n nearest indexed rows to q (d,), among `allowed` model ids when given, nearest first.

    `sel`, when given, is selector(index, allowed) made beforehand; `ef` overrides HNSW's efSearch and
    `rescore` the two-stage index's candidates per result (RESCORE_FACTOR, divided by the share of rows a
    filter allows: at N = 65,000, a 40% filter's exact top 20 were among the candidates for 94 of 100
    queries at 10 per result, 99 at 20, 100 at 40).
    """
    n = min(n, index.ntotal if allowed is None else len(allowed))
    if n <= 0:
        return np.empty(0, np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)[None, :]
    if allowed is not None and sel is None:
        sel = selector(index, allowed)
    inner = _inner(index)
    if isinstance(inner, faiss.IndexRefine):
        factor = rescore or RESCORE_FACTOR
        if allowed is not None and rescore is None:  # the walk finds matching rows at the filter's rate
            factor = min(math.ceil(factor * index.ntotal / max(len(allowed), 1)), max(1, index.ntotal // n))
        graph = faiss.SearchParametersHNSW()
        graph.efSearch = ef or _ef(factor * n)
        params = faiss.IndexRefineSearchParameters(k_factor=float(factor))
        params.base_index_params = graph
        if sel is None:
            out = index.search(q, n, params=params)[1][0]
        else:  # below the id map, so the graph's selector sees rows; the rows found map to ids here
            graph.sel = sel
            rows = inner.search(q, n, params=params)[1][0]
            rows = rows[rows >= 0]
            return _id_view(index)[rows]
    else:
        params = faiss.SearchParametersHNSW() if isinstance(inner, faiss.IndexHNSW) else faiss.SearchParameters()
        if isinstance(inner, faiss.IndexHNSW):
            params.efSearch = ef or max(EF_MIN, EF_FACTOR * n)
        if sel is not None:
            params.sel = sel
        out = index.search(q, n, params=params)[1][0]
    return out[out >= 0]


def search_rows(X: np.ndarray, q: np.ndarray, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, squared distances) of the n rows of X (N, k) nearest q (k,) among `rows`, nearest first: an
    exact scan of those rows alone (a filter's few thousand models cost less than a filtered HNSW walk)."""
    n = min(n, len(rows))
    if n <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    dist, found = np.empty(n, np.float32), np.empty(n, np.int64)
    nx, d = X.shape
    faiss.knn_L2sqr_by_idx(
        swig_ptr(q), swig_ptr(X), swig_ptr(rows), d, 1, nx, len(rows), n, swig_ptr(dist), swig_ptr(found)
    )
    ok = found >= 0
    return found[ok], dist[ok]
