"""The coefficient index's neighbour lists: exact, tied to the rows they were made for, and used by search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from registry import index as coeff_index


def brute_force(Y: np.ndarray, L: int) -> np.ndarray:
    d = ((Y[:, None, :].astype(np.float64) - Y[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    # The order is only defined where it is the same to any float32 kernel: FAISS's BLAS form ||x||^2 + ||y||^2 -
    # 2 x.y errs by <= (k + 2) u (||x||^2 + ||y||^2), u = 2^-24. Make sure no two of the L + 1 nearest are closer.
    first = np.sort(d, axis=1)[:, : L + 1]
    sq = (Y.astype(np.float64) ** 2).sum(1)
    assert np.diff(first, axis=1).min() > (Y.shape[1] + 2) * 2.0**-24 * 2 * sq.max(), "a near-tie: pick another seed"
    return np.argsort(d, axis=1, kind="stable")[:, :L]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_lists_are_the_exact_nearest_rows(kind, monkeypatch):
    monkeypatch.setattr(coeff_index, "HNSW_DIMS", 4)  # a two-stage index when hnsw: the lists read all coordinates
    rng = np.random.default_rng(0)
    Y = (rng.standard_normal((300, 12)) * np.linspace(2, 0.2, 12)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    index = coeff_index.build(Y, ids, kind=kind)
    assert coeff_index.two_stage(index) == (kind == "hnsw")
    rows = coeff_index.neighbor_lists(index, length=10)
    assert rows.shape == (300, 10) and rows.dtype == np.int32
    assert np.array_equal(rows, brute_force(Y, 10))


def test_duplicates_leave_out_the_row_itself():
    Y = np.zeros((5, 3), np.float32)  # five identical models: every other one is a nearest neighbour
    rows = coeff_index.neighbor_lists(coeff_index.build(Y, np.arange(5)), length=4)
    for i in range(5):
        assert sorted(rows[i].tolist()) == [j for j in range(5) if j != i]
    rows = coeff_index.neighbor_lists(coeff_index.build(np.zeros((8, 3), np.float32), np.arange(8)), length=3)
    assert all(i not in rows[i] for i in range(8))  # more duplicates than the list holds


def test_lists_load_only_for_the_rows_they_were_made_for(tmp_path):
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((50, 6)).astype(np.float32)
    ids = np.arange(100, 150, dtype=np.int64)
    index = coeff_index.build(Y, ids)
    path = coeff_index.lists_path(tmp_path / "ss-1.faiss")
    assert path.name == "ss-1.lists.safetensors"
    assert coeff_index.load_lists(path, index) is None  # none written
    coeff_index.save_lists(path, coeff_index.neighbor_lists(index), index)
    lists = coeff_index.load_lists(path, index)
    assert lists.n == 50 and len(lists.added) == 0 and lists.row_of(107) == 7 and lists.row_of(99) is None
    # rows appended to the index: the lists still cover the first 50, the new rows are "added"
    index.add_with_ids(rng.standard_normal((3, 6)).astype(np.float32), np.array([7, 8, 9], dtype=np.int64))
    lists = coeff_index.load_lists(path, index)
    assert lists.n == 50 and lists.added.tolist() == [50, 51, 52] and lists.row_of(8) is None
    # the same models in another order (a rebuild): the rows mean other models, so the lists are refused
    rebuilt = coeff_index.build(Y[::-1].copy(), ids[::-1].copy())
    assert coeff_index.load_lists(path, rebuilt) is None
    # lists of other coordinates (another index transform) are refused too
    coeff_index.save_lists(path, coeff_index.neighbor_lists(index), index, coords="T1")
    assert coeff_index.load_lists(path, index, coords="T1") is not None
    assert coeff_index.load_lists(path, index, coords="T2") is None
    # a damaged file is no lists, not an error
    path.write_bytes(b"not a safetensors file")
    assert coeff_index.load_lists(path, index) is None


def test_search_rows_over_lists_and_added_rows_is_the_exact_top_n():
    """What a search does with the lists when rows were added since: the best n of the list and the new rows."""
    rng = np.random.default_rng(2)
    Y = rng.standard_normal((400, 8)).astype(np.float32)
    index = coeff_index.build(Y[:300], np.arange(300, dtype=np.int64))
    rows = coeff_index.neighbor_lists(index, length=20)
    index.add_with_ids(Y[300:], np.arange(300, 400, dtype=np.int64))
    X = coeff_index.stored(index)
    for q in (0, 17, 250):
        cand = np.concatenate([rows[q].astype(np.int64), np.arange(300, 400)])
        got, _ = coeff_index.search_rows(X, X[q], 20, cand)
        _, want = faiss.knn(X[q : q + 1], X, 21)
        assert got.tolist() == [r for r in want[0].tolist() if r != q][:20]
