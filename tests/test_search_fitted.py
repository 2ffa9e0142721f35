"""Search after a fit: the fast path (index coordinates, few candidates, exact re-rank) answers as exact=True."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import PLANTED_LAYOUT, mapped_kb

from ingest.synthetic import Population
from registry import index as coeff_index
from registry import wspace
from registry.catalog import Catalog
from registry.registry import CANDIDATE_MIN, NewModel, Registry
from registry.search import MappedStore, knn, rerank
from registry.vectors import VectorStore
from w2w.flatten import unflatten
from w2w.formats import write_lora

LAYOUT = PLANTED_LAYOUT  # D = 1,152
BASE = "planted/base"
N = 900
WHERE = "smile AND NOT hat"  # ~1/4 of the models: over the exact-scan threshold, so through the index
U32 = 2.0**-24  # float32 unit roundoff
# rerank keeps FAISS's float32 distance where no neighbour is within its error (float64 elsewhere): a float32 sum of
# D squared differences (each rounded too) is within (D + 1) u of the true d^2, whatever the order or SIMD width
KERNEL_RTOL = (LAYOUT.dim + 1) * U32  # 6.9e-5


def names(result) -> list[str]:
    return [h.model.name for h in result.hits]


@pytest.fixture(scope="module", params=["flat", "hnsw", "two-stage"])
def fitted(request, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    if request.param != "flat":
        mp.setattr(coeff_index, "HNSW_MIN", 0)  # HNSW from the first model, as a large registry would
    if request.param == "hnsw":
        mp.setattr(coeff_index, "HNSW_DIMS", 1000)  # a graph over every coordinate
    if request.param == "two-stage":
        mp.setattr(coeff_index, "HNSW_DIMS", 8)  # a graph over the 8 leading of 30 coordinates, rescored on all
    pop = Population(LAYOUT, latent=12, seed=11, noise=0.002)
    reg = Registry.init(tmp_path_factory.mktemp(f"fitted-{request.param}"))
    reg.add_models(NewModel(f"f{i:04d}", pop.vector(i), LAYOUT, BASE, attributes=pop.attributes(i)) for i in range(N))
    wspace.fit_space(reg, components=30)
    yield reg, pop, request.param
    mp.undo()


@pytest.mark.parametrize("lists", [True, False])
def test_fast_path_is_taken_and_equals_exact(fitted, monkeypatch, lists):
    """With the neighbour lists, and without them (the index's own search: flat, graph or two-stage)."""
    monkeypatch.setattr(wspace, "USE_LISTS", lists)
    reg, _, kind = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    index = coeff_index.load(sm.index_path)
    assert coeff_index.kind_of(index) == ("flat" if kind == "flat" else "hnsw")
    assert coeff_index.two_stage(index) == (kind == "two-stage")
    assert len(reg.ls(WHERE)) > CANDIDATE_MIN + 20  # over the exact-scan threshold
    answered = []  # what the fast path returned: None would mean it handed over to the exact path
    real = reg._search_fitted
    monkeypatch.setattr(reg, "_search_fitted", lambda *a: answered.append(real(*a)) or answered[-1])
    for i in range(0, N, 37):
        for where in (None, WHERE):
            fast = reg.search(f"f{i:04d}", k=10, where=where)
            exact = reg.search(f"f{i:04d}", k=10, where=where, exact=True)
            assert names(fast) == names(exact), (i, where)
            assert f"f{i:04d}" not in names(fast)
            assert np.allclose([h.distance for h in fast.hits], [h.distance for h in exact.hits], rtol=KERNEL_RTOL)
    assert len(answered) == 2 * len(range(0, N, 37)) and all(r is not None for r in answered)


def test_warm_search_runs_no_sql_and_a_write_invalidates(fitted, monkeypatch):
    reg, pop, _ = fitted
    reg.search("f0001", k=10)
    reg.search("f0001", k=10, where=WHERE)
    opened = []
    real = Catalog.connect
    monkeypatch.setattr(Catalog, "connect", lambda self, *a, **kw: opened.append(1) or real(self, *a, **kw))
    for i in (1, 2, 300, 899):
        reg.search(f"f{i:04d}", k=10)
        reg.search(f"f{i:04d}", k=10, where=WHERE)
    assert not opened  # model table, row table, filter ids and subspace: all cached
    monkeypatch.setattr(Catalog, "connect", real)
    # a model added after the fit: projected, indexed, and found by the next search (the caches follow)
    near = pop.vector(5) + 1e-4 * np.random.default_rng(1).standard_normal(LAYOUT.dim).astype(np.float32)
    attrs = pop.attributes(5)
    reg.add_models([NewModel("late-twin", near, LAYOUT, BASE, attributes=attrs)])
    fast = reg.search("f0005", k=10)
    assert names(fast)[0] == "late-twin"
    assert names(fast) == names(reg.search("f0005", k=10, exact=True))
    late = reg.search("late-twin", k=10)  # and as the query
    assert names(late)[0] == "f0005" and names(late) == names(reg.search("late-twin", k=10, exact=True))
    if attrs["smile"] and not attrs["hat"]:
        assert "late-twin" in names(reg.search("f0005", k=10, where=WHERE))


def test_a_model_added_after_the_fit_is_searched_like_the_others(fitted):
    reg, pop, _ = fitted
    new = [NewModel(f"after{i}", pop.vector(N + i), LAYOUT, BASE, attributes=pop.attributes(N + i)) for i in range(30)]
    reg.add_models(new)
    sm = wspace.require(reg, reg.spaces()[0].id)
    assert coeff_index.reconstruct(coeff_index.load(sm.index_path), reg.get("after3").id) is not None
    for query in ("after0", "after3", "f0100"):
        for where in (None, WHERE):
            assert names(reg.search(query, k=10, where=where)) == names(
                reg.search(query, k=10, where=where, exact=True)
            ), (query, where)


def test_a_file_as_query_and_other_metrics(fitted, tmp_path):
    reg, pop, _ = fitted
    path = tmp_path / "probe.safetensors"
    write_lora(unflatten(pop.vector(N + 100), LAYOUT, BASE), path, "diffusers")
    for where in (None, WHERE):
        assert names(reg.search(path, k=10, where=where)) == names(reg.search(path, k=10, where=where, exact=True))
    for metric in ("cosine", "delta"):
        fast = reg.search("f0042", k=5, metric=metric)
        assert names(fast) == names(reg.search("f0042", k=5, metric=metric, exact=True))


def test_index_transform_gives_weight_space_distances(fitted):
    reg, _, _ = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    assert sm.index_transform is not None
    rng = np.random.default_rng(0)
    c1, c2 = rng.standard_normal((2, sm.sub.k)).astype(np.float32)
    want = np.linalg.norm(sm.sub.std * (sm.sub.components @ (c1 - c2)))  # ||S V (c1 - c2)||
    got = np.linalg.norm(sm.index_coords(c1) - sm.index_coords(c2))
    # float32 both sides: want's norm of D terms ~sqrt(D) u = 2e-6; T is made from G = (SV)^T SV, a float32 product
    # over D = 1,152 rows (~sqrt(D) u relative), which the distance feels times cond(G) (~23): ~5e-5
    assert got == pytest.approx(want, rel=1e-4)
    # the index holds the stored coefficients, transformed: C @ T in float32, then (a batch at the fit) and now (one
    # row), maybe by other kernels: each coordinate within k u (|c| |T|) of the exact one
    index = coeff_index.load(sm.index_path)
    m = reg.get("f0007")
    c = wspace.coefficients(reg, sm, [m.id])[0]
    bound = 2 * sm.sub.k * U32 * (np.abs(c).astype(np.float64) @ np.abs(sm.index_transform))
    assert np.all(np.abs(coeff_index.reconstruct(index, m.id) - sm.index_coords(c).astype(np.float64)) <= bound)


def test_a_registered_model_takes_its_candidates_from_the_neighbour_lists(fitted, monkeypatch):
    """No graph walk or scan of the index for a model the lists cover; a file still goes through the index;
    and a model added after the lists is both found (the added rows are scanned) and searched from."""
    from registry.integrity import repair, verify

    reg, pop, _ = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    path = coeff_index.lists_path(sm.index_path)
    assert path.exists()
    walks = []
    real = coeff_index.search
    monkeypatch.setattr(coeff_index, "search", lambda *a, **kw: walks.append(1) or real(*a, **kw))
    for i in (3, 450, 899):
        assert names(reg.search(f"f{i:04d}", k=10)) == names(reg.search(f"f{i:04d}", k=10, exact=True))
    assert not walks
    reg.search("f0003", k=30)  # k beyond what the lists hold: the index
    assert walks
    # models added since the lists: found by the others' searches; their own go through the index
    twin = pop.vector(77) + 1e-4 * np.random.default_rng(5).standard_normal(LAYOUT.dim).astype(np.float32)
    reg.add_models([NewModel("twin-77", twin, LAYOUT, BASE, attributes=pop.attributes(77))])
    index = coeff_index.load(sm.index_path)
    lists = coeff_index.load_lists(path, index, sm.coords_digest)
    assert lists is not None and reg.get("twin-77").id in lists.ids[lists.added]
    walks.clear()
    fast = reg.search("f0077", k=10)
    assert not walks and names(fast)[0] == "twin-77" and names(fast) == names(reg.search("f0077", k=10, exact=True))
    assert names(reg.search("twin-77", k=10)) == names(reg.search("twin-77", k=10, exact=True)) and walks
    # lists removed: verify calls the index stale (not an error), search still exact, repair rebuilds them
    path.unlink()
    report = verify(reg)
    assert report.ok and [f.kind for f in report.findings] == ["stale"]
    assert names(reg.search("f0450", k=10)) == names(reg.search("f0450", k=10, exact=True))
    assert any("neighbour lists rebuilt" in line for line in repair(reg))
    index = coeff_index.load(sm.index_path)
    assert verify(reg).findings == [] and coeff_index.load_lists(path, index, sm.coords_digest).n == index.ntotal


def test_the_lists_are_rebuilt_once_many_models_were_added(fitted):
    reg, pop, _ = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    path = coeff_index.lists_path(sm.index_path)
    n0 = coeff_index.load_lists(path, coeff_index.load(sm.index_path), sm.coords_digest).n
    limit = int(wspace.LISTS_STALE * max(n0, 1000))
    batch = [NewModel(f"bulk{i}", pop.vector(5000 + i), LAYOUT, BASE, attributes=pop.attributes(5000 + i))
             for i in range(limit)]  # fmt: skip
    reg.add_models(batch)  # exactly the share the lists tolerate: kept
    index = coeff_index.load(sm.index_path)
    assert coeff_index.load_lists(path, index, sm.coords_digest).n == n0
    reg.add_models([NewModel("one-more", pop.vector(6000), LAYOUT, BASE, attributes=pop.attributes(6000))])
    index = coeff_index.load(sm.index_path)
    lists = coeff_index.load_lists(path, index, sm.coords_digest)
    assert lists.n == index.ntotal and len(lists.added) == 0  # made again over every row
    assert names(reg.search("bulk7", k=10)) == names(reg.search("bulk7", k=10, exact=True))


def test_index_coordinates_come_in_decreasing_variance(fitted):
    """What lets the two-stage index build its graph over the leading coordinates only."""
    reg, _, _ = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    assert sm.ordered
    fitted_ids = np.asarray(sm.sub.model_ids, np.int64)
    Y = sm.index_coords(wspace.coefficients(reg, sm, fitted_ids.tolist())).astype(np.float64)
    cov = np.cov(Y, rowvar=False)
    var = np.diag(cov)
    # non-increasing, up to float32 coordinates: each coordinate's rounding (~sqrt(k) u = 3e-7 of it) moves a
    # variance over 900 rows by ~2 sqrt(k) u / sqrt(900) ~ 2e-8 of itself; 1e-6 of var[0] covers that many times
    assert np.all(np.diff(var) <= 1e-6 * var[0])
    off = cov - np.diag(var)
    # and uncorrelated (the principal axes of the coordinates): zero up to the same rounding; a wrong axis is O(1)
    assert np.abs(off).max() <= 1e-3 * var[0]


def test_a_subspace_from_before_ordered_coordinates_is_searched_then_reindexed(fitted, tmp_path):
    """A transform written without the order (older releases): its index is the legacy graph over every
    coordinate, searches stay exact; `reindex` (what `repair` runs) writes the ordered transform, and the
    same Registry object (its cached subspace, index and lists) searches in the new coordinates at once."""
    from safetensors.numpy import save

    from registry.integrity import verify

    reg, pop, kind = fitted
    probe = tmp_path / "probe.safetensors"  # a file as query: projected with the cached transform
    write_lora(unflatten(pop.vector(N + 200), LAYOUT, BASE), probe, "diffusers")
    sm = wspace.require(reg, reg.spaces()[0].id)
    Vs = sm.sub.components.astype(np.float64) * sm.sub.std[:, None]
    legacy = np.linalg.cholesky(Vs.T @ Vs).astype(np.float32)  # what older releases wrote
    (sm.folder / wspace.INDEX_TRANSFORM_FILE).write_bytes(save({"transform": legacy}))
    sm = wspace.load_model(reg, sm.id, sm.space_id, sm.error_p95)
    assert not sm.ordered
    wspace._index_all(reg, sm, lambda _: None)
    index = coeff_index.load(sm.index_path)
    assert not coeff_index.two_stage(index)  # a graph over unordered coordinates keeps all of them
    assert [f.kind for f in verify(reg).findings] == ["stale"]
    for query in ("f0200", probe):
        for where in (None, WHERE):
            assert names(reg.search(query, k=10, where=where)) == names(
                reg.search(query, k=10, where=where, exact=True)
            )
    wspace.reindex(reg, sm)  # no cache cleared: the stamps tell
    sm = wspace.require(reg, reg.spaces()[0].id)
    assert sm.ordered and coeff_index.two_stage(coeff_index.load(sm.index_path)) == (kind == "two-stage")
    assert verify(reg).findings == []
    for query in ("f0200", probe):
        assert names(reg.search(query, k=10)) == names(reg.search(query, k=10, exact=True))


def test_reindex_rebuilds_the_index_from_the_coefficients(fitted):
    reg, _, kind = fitted
    sm = wspace.require(reg, reg.spaces()[0].id)
    before = names(reg.search("f0300", k=10))
    sm.index_path.unlink()
    wspace.reindex(reg, sm)
    index = coeff_index.load(sm.index_path)
    assert coeff_index.kind_of(index) == ("flat" if kind == "flat" else "hnsw")
    assert coeff_index.two_stage(index) == (kind == "two-stage")
    assert names(reg.search("f0300", k=10)) == before


def test_rerank_orders_near_ties_exactly(tmp_path):
    rng = np.random.default_rng(3)
    D = 300
    X = rng.standard_normal((40, D)).astype(np.float32)
    q = rng.standard_normal(D).astype(np.float32)
    X[7] = X[3]
    X[7, 0] = np.nextafter(X[3, 0], np.float32(np.inf))  # a near-duplicate: distances ~1e-8 apart
    X[9] = q + 1e-3  # the nearest, far from the others
    store = VectorStore(tmp_path / "v", D, 16)
    store.write_rows(0, X)
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    rows = np.arange(40)
    want_rows, want_d = knn(store, q, 12, "l2", None, rows, sq)
    for prefetch in ("auto", True, False):
        got_rows, got_d = rerank(MappedStore(store), q, 12, rng.permutation(rows), prefetch=prefetch)
        assert got_rows.tolist() == want_rows.tolist()
        assert np.allclose(got_d, want_d, rtol=(D + 1) * U32)  # float32 kernel distances kept (see KERNEL_RTOL)
        assert got_rows[0] == 9
    assert rerank(MappedStore(store), q, 3, rows[:0])[0].size == 0


def test_rerank_auto_prefetches_once_a_row_is_slow(tmp_path, monkeypatch):
    from registry import search

    D = 64
    store = VectorStore(tmp_path / "v", D, 8)
    store.write_rows(0, np.random.default_rng(0).standard_normal((20, D)).astype(np.float32))
    asked = []
    mapped = MappedStore(store)
    real = mapped.prefetch
    monkeypatch.setattr(mapped, "prefetch", lambda rows: asked.append(list(rows)) or real(rows))
    rerank(mapped, np.zeros(D, np.float32), 5, np.arange(20))
    assert asked == []  # every row was in memory: nothing to prefetch
    monkeypatch.setattr(search, "PREFETCH_AFTER_S", -1.0)  # as if the first row came from disk
    rerank(mapped, np.zeros(D, np.float32), 5, np.arange(20))
    assert asked == [list(range(1, 20))]  # the rest, at once, and only once


def test_index_transform_preserves_distances_in_variance_order():
    """T T^T = V^T S^2 V (so ||c T|| is the weight-space norm of S V c), and the fitted models' coordinates C T
    are uncorrelated with decreasing variance: (C T)^T (C T) = T^T diag(s^2) T is diagonal, descending."""
    from w2w.subspace import Subspace

    rng = np.random.default_rng(3)
    D, k = 4_000, 300
    V = np.linalg.qr(rng.standard_normal((D, k)))[0].astype(np.float32)
    std = rng.uniform(0.2, 3.0, D).astype(np.float32)
    s = np.sort(rng.uniform(0.5, 20.0, k))[::-1]
    sub = Subspace(np.zeros(D, np.float32), std, V, s, 1.0, 10, list(range(10)), {})
    T = wspace.index_transform(sub)
    assert T.dtype == np.float32 and T.shape == (k, k) and T.flags.c_contiguous
    T = T.astype(np.float64)
    SV = V.astype(np.float64) * std[:, None]
    G = SV.T @ SV
    # T is float32 (u = 6e-8) of a float64 computation from G's float32 block products (~sqrt(D) u relative)
    np.testing.assert_allclose(T @ T.T, G, atol=1e-5 * np.abs(G).max())
    C = T.T @ (s[:, None] ** 2 * T)
    d = np.diag(C)
    assert np.abs(C - np.diag(d)).max() <= 1e-5 * d.max()
    assert np.all(np.diff(d) <= 1e-6 * d.max())
    sm = wspace.SpaceModel("ss", "sp", sub, s, s, 0.1, Path("."), Path("."), T.astype(np.float32), True)
    C = rng.standard_normal((9000, k)).astype(np.float32)  # three blocks of rows
    want = C @ sm.index_transform
    got = sm.index_coords(C, overwrite=True)
    assert got is C  # in C's own buffer
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_saved_components_are_mapped_and_handed_back_once_read(tmp_path):
    """A saved subspace's components come back as a read-only map of its file (nothing read until used); a
    Subspace made to read its saved file frees its own copy; the index transform computed from the map equals
    the one from memory and leaves at most a block of the file (16,384 rows) and the kernel's read-ahead
    resident. Components of 25.6 MB: kept mapped, they would fail the bound."""
    import weakref

    from w2w.subspace import SUBSPACE_FILE, Subspace, SubspaceError

    rng = np.random.default_rng(4)
    D, k = 100_000, 64
    V = np.linalg.qr(rng.standard_normal((D, k)).astype(np.float32))[0]
    sub = Subspace(np.zeros(D, np.float32), rng.uniform(0.5, 2, D).astype(np.float32), V, np.arange(k, 0, -1.0),
                   1.0, 10, list(range(10)), {})  # fmt: skip
    sub.save(tmp_path)
    path = tmp_path / SUBSPACE_FILE
    loaded = Subspace.load(tmp_path)
    assert not loaded.components.flags.writeable and mapped_kb(path) < 1024
    np.testing.assert_array_equal(loaded.components, V)
    np.testing.assert_array_equal(wspace.index_transform(loaded), wspace.index_transform(sub))
    assert mapped_kb(path) <= (16_384 * k * 4 >> 10) + (6 << 10)  # read-ahead: ~3 MB measured here
    own = weakref.ref(sub.components)
    del V
    sub.map_components(tmp_path)
    assert own() is None and not sub.components.flags.writeable
    path.write_bytes(path.read_bytes()[:-100])  # truncated: said, not a crash deep in numpy
    with pytest.raises(SubspaceError, match="cannot be read.*w2wreg verify"):
        Subspace.load(tmp_path)
