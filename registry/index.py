"""The FAISS index over one subspace's coefficients: candidates for search, re-ranked exactly afterwards.

IndexIDMap2 over IndexFlatL2 while small (exact in coefficient space), over IndexHNSWFlat once the
space holds HNSW_MIN models or more. Ids are model ids; a filter is an IDSelectorBatch of model ids
passed in the search parameters, so filtered searches still return k candidates, or an exact scan of the
filter's rows (`search_rows` over `stored`). The vectors it holds are the coefficients in the
coordinates the subspace's index transform gives them (registry.wspace.index_transform: distances there
are distances in weight space), and a model's own are read back with `reconstruct`.
It is derived data: `repair` rebuilds it from the vectors and the subspace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from faiss import swig_ptr

HNSW_MIN = 20_000
# Measured at N = 65,000, k = 1,000 (bench/bench_search_fitted.py, 200 queries): recall@10 after the exact
# re-rank of 20 HNSW candidates was 0.972 at efSearch 64 with M = 32, efConstruction = 80 (0.9985 at 384);
# with M = 48, efConstruction = 400 (81 s to build): 0.997 at 64, 0.9995 at 96 (0.93 ms), 1.0 at 192 (1.7 ms).
HNSW_M, HNSW_EF_CONSTRUCTION = 48, 400
EF_MIN, EF_FACTOR = 96, 5  # HNSW efSearch for n candidates: max(EF_MIN, EF_FACTOR * n)


def build(coeffs: np.ndarray, ids: np.ndarray, kind: str = "auto") -> faiss.Index:
    """An index over coefficient rows (n, k) with model ids (n,)."""
    k = coeffs.shape[1]
    if kind == "auto":
        kind = "hnsw" if len(coeffs) >= HNSW_MIN else "flat"
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(k, HNSW_M)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif kind == "flat":
        inner = faiss.IndexFlatL2(k)
    else:
        raise ValueError(f"unknown index kind {kind!r}; known: auto, flat, hnsw")
    index = faiss.IndexIDMap2(inner)
    if len(coeffs):
        index.add_with_ids(np.ascontiguousarray(coeffs, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


def kind_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index)
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"


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


def ids_of(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def stored(index: faiss.Index) -> np.ndarray:
    """The indexed vectors (ntotal, d), in insertion order (ids_of gives their ids): a view, valid while the
    index lives."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    flat = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
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


def selector(allowed: np.ndarray) -> faiss.IDSelector:
    """An ID selector for a set of model ids (it copies them; build it once per filter and reuse it)."""
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    return faiss.IDSelectorBatch(len(allowed), swig_ptr(allowed))


def search(
    index: faiss.Index,
    q: np.ndarray,
    n: int,
    allowed: np.ndarray | None = None,
    ef: int | None = None,
    sel: faiss.IDSelector | None = None,
) -> np.ndarray:
    """Ids of up to n nearest indexed rows to q (d,), among `allowed` model ids when given, nearest first.

    `sel`, when given, is selector(allowed) made beforehand; `ef` overrides HNSW's efSearch.
    """
    n = min(n, index.ntotal if allowed is None else len(allowed))
    if n <= 0:
        return np.empty(0, np.int64)
    hnsw = kind_of(index) == "hnsw"
    params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
    if hnsw:
        params.efSearch = ef or max(EF_MIN, EF_FACTOR * n)
    if allowed is not None:
        params.sel = sel if sel is not None else selector(allowed)
    _, I = index.search(np.ascontiguousarray(q, dtype=np.float32)[None, :], n, params=params)
    out = I[0]
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
