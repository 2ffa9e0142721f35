"""The FAISS index over one subspace's coefficients: candidates for search, re-ranked exactly afterwards.

IndexIDMap2 over IndexFlatL2 while small (exact in coefficient space), over IndexHNSWFlat once the
space holds HNSW_MIN models or more. Ids are model ids; a filter is an IDSelectorBatch of model ids
passed in the search parameters, so filtered searches still return k candidates.
It is derived data: `repair` rebuilds it from the vectors and the subspace.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
from faiss import swig_ptr

HNSW_MIN = 20_000
HNSW_M = 32


def build(coeffs: np.ndarray, ids: np.ndarray, kind: str = "auto") -> faiss.Index:
    """An index over coefficient rows (n, k) with model ids (n,)."""
    k = coeffs.shape[1]
    if kind == "auto":
        kind = "hnsw" if len(coeffs) >= HNSW_MIN else "flat"
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(k, HNSW_M)
        inner.hnsw.efConstruction = 80
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


def search(index: faiss.Index, q: np.ndarray, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Ids of up to n nearest coefficient rows to q (k,), among `allowed` model ids when given."""
    n = min(n, index.ntotal if allowed is None else len(allowed))
    if n <= 0:
        return np.empty(0, np.int64)
    hnsw = kind_of(index) == "hnsw"
    params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
    if hnsw:
        params.efSearch = max(64, 2 * n)
    if allowed is not None:
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        sel = faiss.IDSelectorBatch(len(allowed), swig_ptr(allowed))
        params.sel = sel
    _, I = index.search(np.ascontiguousarray(q, dtype=np.float32)[None, :], n, params=params)
    out = I[0]
    return out[out >= 0]
