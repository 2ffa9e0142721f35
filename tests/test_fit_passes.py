"""The fit's Gram pass in this process (centering only, scaling folded into the D x l operands, BLAS adding
each block's product in place) and the default Krylov shape."""

from __future__ import annotations

import os
import resource
import threading

import numpy as np
import pytest

from w2w import subspace
from w2w.subspace import (
    DEPTH,
    EXACT_ROWS,
    ArraySource,
    FitConfig,
    block_stats,
    default_block,
    fit,
    gram_in_place,
    map_in_process,
    mapped_gram,
    merge_stats,
    stats_in_place,
)

U = 2.0**-24  # float32 unit roundoff


class Buffered(ArraySource):
    """A source with load_into (a pass reads into buffers it reuses and may change them in place)."""

    def load_into(self, spec, out):
        out[...] = self.X[spec[0] : spec[1]]
        return out


class Copied(Buffered):
    """A source that never has a block in place (view None): every pass copies."""

    def view(self, spec):
        return None


@pytest.fixture(scope="module")
def offset_data():
    """Columns whose mean is up to 50 times their spread: centering in float32 is where precision goes."""
    rng = np.random.default_rng(3)
    spread = rng.uniform(0.01, 2.0, 600)
    X = rng.standard_normal((500, 600)) * spread + rng.uniform(-50, 50, 600) * spread
    return X.astype(np.float32)


@pytest.mark.parametrize("source_cls", [ArraySource, Buffered])
def test_gram_in_place_equals_the_dense_product_and_the_blockwise_pass(offset_data, source_cls):
    X = offset_data
    mean, std = X.mean(0, dtype=np.float64), X.std(0, ddof=1, dtype=np.float64)
    G = np.linalg.qr(np.random.default_rng(1).standard_normal((600, 24)))[0].astype(np.float32)
    source = source_cls(X.copy(), 64)  # 7 blocks of 64 and one of 52
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    Y = np.full((500, 24), np.nan, dtype=np.float32)
    P = gram_in_place(source, source.specs(), mean32, std32, G, Y)
    Z = (X.astype(np.float64) - mean) / std
    exact_y = Z @ G.astype(np.float64)
    exact = Z.T @ exact_y
    # Centering a float32 entry of 51 spreads rounds it by <= 51 u of the spread, the two products over 500
    # rows and 600 columns add ~sqrt(600) u each: ~1e-5 of |P|'s scale at most; 1e-4 leaves 10x.
    scale, scale_y = np.abs(exact).max(), np.abs(exact_y).max()
    np.testing.assert_allclose(P, exact, atol=1e-4 * scale)
    np.testing.assert_allclose(Y, exact_y, atol=1e-4 * scale_y)  # every row written
    for gram in (gram_in_place, mapped_gram(map_in_process)):  # the latter: block_gram as Dask runs it
        Y2, Y3 = np.full_like(Y, np.nan), np.full_like(Y, np.nan)
        np.testing.assert_allclose(gram(source, source.specs(), mean32, std32, G, Y2), exact, atol=1e-4 * scale)
        np.testing.assert_allclose(Y2, exact_y, atol=1e-4 * scale_y)
        assert gram(source, source.specs(), mean32, std32, G, Y3, False) is None  # the last pass: Z G alone
        np.testing.assert_array_equal(Y3, Y2)  # the same products, block by block
    assert P.shape == (600, 24) and P.dtype == np.float32 and P.flags.c_contiguous
    assert Y.shape == (500, 24) and Y.dtype == np.float32 and Y.flags.c_contiguous
    np.testing.assert_array_equal(source.X, X)  # the source's own array is never centered in place


class FromDisk:
    """Blocks of a float32 file read with pread. Before an even block the whole file is dropped from the page
    cache (posix_fadvise DONTNEED; its pages are clean after fsync), and the even block's read also reads the
    next block: even reads go to storage, odd ones find their block cached (read whole or by chunks)."""

    def __init__(self, path, n, dim, rows):
        self.path, self.n, self.dim, self.rows, self.ahead = path, n, dim, rows, []

    def specs(self):
        return [(lo, min(lo + self.rows, self.n)) for lo in range(0, self.n, self.rows)]

    def load(self, spec):
        return self.load_into(spec, np.empty((spec[1] - spec[0], self.dim), dtype=np.float32))

    def load_into(self, spec, out):
        self.ahead.append((spec[0], threading.current_thread() is not threading.main_thread()))
        fd = os.open(self.path, os.O_RDONLY)
        # no kernel readahead: an earlier read's asynchronous readahead of the next blocks, still in flight when
        # DONTNEED comes (which cannot drop pages under I/O), left an even block cached under load (flaky)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            offset, size = 4 * spec[0] * self.dim, out.nbytes
            if (spec[0] // self.rows) % 2 == 0 and spec[0] % self.rows == 0:  # an even block's first rows
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                block = 4 * self.rows * self.dim
                os.preadv(fd, [bytearray(block)], 4 * spec[0] * self.dim + block)  # the next block, into the cache
            assert os.preadv(fd, [memoryview(out).cast("B")], offset) == size
        finally:
            os.close(fd)
        return out


def test_map_in_process_reads_ahead_only_after_a_read_from_storage(tmp_path):
    if not hasattr(resource, "RUSAGE_THREAD"):
        pytest.skip("no per-thread block-input count here: every read is made ahead")
    X = np.random.default_rng(0).standard_normal((80, 4096)).astype(np.float32)  # 10 blocks of 8 x 128 KB
    path = tmp_path / "x.f32"
    with open(path, "wb") as f:
        f.write(X.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED can evict them
    source = FromDisk(path, 80, 4096, 8)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_inblock
    source.load_into((0, 8), np.empty((8, 4096), dtype=np.float32))
    if resource.getrusage(resource.RUSAGE_THREAD).ru_inblock == before:
        pytest.skip(f"{tmp_path} reads without block input (a memory file system)")
    source.ahead.clear()

    def fn(spec, W):
        out = (spec, W.copy())
        W[...] = -1  # a pass may change its block in place
        return out

    got = list(map_in_process(fn, source, source.specs()))
    np.testing.assert_array_equal(np.vstack([w for _, w in got]), X)  # every block intact, in order
    # block 0's read goes to storage, so block 1 is read on the thread (while block 0 is computed); block 1's
    # comes from the page cache, so block 2 is read in line, after block 1 is done; and so on
    assert source.ahead == [(lo, (lo // 8) % 2 == 1) for lo in range(0, 80, 8)]


@pytest.mark.parametrize("source_cls", [ArraySource, Buffered, Copied])
def test_stats_in_place_equals_the_merged_blocks_and_the_exact_statistics(offset_data, source_cls):
    X = offset_data
    source = source_cls(X.copy(), 64)
    n, mean, m2, sketch, osum = stats_in_place(source, source.specs(), 5, 12)
    ref = merge_stats(map_in_process(block_stats, source, source.specs(), (5, 12)))
    assert n == ref[0] == 500 and sketch.shape == (12, 600) and sketch.T.flags.c_contiguous
    X64 = X.astype(np.float64)
    # The mean is a float32 mean corrected by the float64 sum of the float32 deviations from it, each rounded
    # by u of its own size: off by <= u max|w - mean| per column, below the u |w| every float32 entry carries
    # (up to 51 spreads here). M2 from float32 deviations (each rounded by <= 51 u of its spread, see above),
    # summed in float32 over a block of 64 rows: <= ~64 u relative per block; 1e-5 leaves ~20x.
    dev = np.abs(X64 - X64.mean(0)).max(0)
    np.testing.assert_array_less(np.abs(mean - X64.mean(0)), 2 * U * dev + 1e-12 * np.abs(X64).max(0))
    assert np.abs(mean - X64.mean(0)).max() < U * np.abs(X64).max()  # better than the data's own rounding
    np.testing.assert_allclose(m2, ((X64 - X64.mean(0)) ** 2).sum(0), rtol=1e-5)
    np.testing.assert_array_less(np.abs(mean - ref[1]), 2 * U * dev + 1e-12 * np.abs(X64).max(0))
    np.testing.assert_allclose(m2, ref[2], rtol=1e-5)
    np.testing.assert_allclose(osum, ref[4], rtol=1e-6)
    # Omega^T W: each entry a sum of 500 products of |W| <= ~100 by unit normals, in float32 in two summation
    # orders: both within ~sqrt(500) u of sum |omega w|; 1e-5 of the largest leaves ~40x
    np.testing.assert_allclose(sketch, ref[3], atol=1e-5 * np.abs(ref[3]).max())
    np.testing.assert_array_equal(source.X, X)  # a view of the caller's array is never changed


def test_default_krylov_fit_is_accurate_and_orthonormal():
    """Data of rank 40 plus noise, k = 20: the Krylov path (not the small-data exact one), the default shape."""
    rng = np.random.default_rng(7)
    X = (rng.standard_normal((400, 40)) * np.logspace(0, -1, 40)) @ rng.standard_normal((40, 800))
    X = (X + 0.05 * rng.standard_normal((400, 800))).astype(np.float32)
    said: list[str] = []
    sub = fit(ArraySource(X, 64), FitConfig(components=20), progress=said.append)
    l = default_block(20, 16)
    assert sub.config["depth"] == DEPTH and sub.config["block"] == l and DEPTH * l < 400  # the Krylov path
    assert any(f"l = {l}, depth {DEPTH}" in m for m in said)  # the plan line says the shape chosen
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    s = np.linalg.svd(Z.astype(np.float64), compute_uv=False)
    # Weyl: float32 Z moves each singular value by <= ||dZ|| ~ sqrt(D) u sigma_1 (~2e-6 sigma_1); the top 20
    # of 40 well-separated directions converge in a 5-block Krylov space of 115 dimensions far below that
    np.testing.assert_allclose(sub.singular_values, s[:20], rtol=1e-4)
    # K^T K's blocks above the diagonal are taken as zero (the blocks are orthogonalized twice): if they were
    # not rounding, V = K Q would not come out orthonormal. A float32 basis of D = 800 rows: ~sqrt(D) u = 2e-6
    V = np.asarray(sub.components, dtype=np.float64)
    np.testing.assert_allclose(V.T @ V, np.eye(20), atol=1e-5)


def test_a_krylov_space_as_large_as_many_rows_takes_fewer_blocks_not_the_exact_path():
    """N = 600 rows (above EXACT_ROWS), k = 380: 5 default blocks of 143 would pass N, and the exact path
    would hold D x N arrays; 4 blocks (m = 572) make a space just under the data's rank instead."""
    rng = np.random.default_rng(11)
    X = ((rng.standard_normal((600, 600)) * np.logspace(0, -2, 600)) @ rng.standard_normal((600, 800))).astype(
        np.float32
    )
    sub = fit(ArraySource(X, 128), FitConfig(components=380))
    assert EXACT_ROWS < 600 and (sub.config["block"], sub.config["depth"]) == (default_block(380, 16), 4)
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    s = np.linalg.svd(Z.astype(np.float64), compute_uv=False)
    # a 572-dimensional Krylov space of a rank-599 matrix whose spectrum falls 100x: the top half of the k
    # Ritz values converge to float32's floor (~1e-5, the exact path's own error in the sweep); 1e-3 is room
    np.testing.assert_allclose(sub.singular_values[:190], s[:190], rtol=1e-3)


def test_the_papers_fit_with_the_default_shape_plans_under_8_gb_on_disk():
    """k = 10,000 at N = 64,974, D = 99,648 (bench_fit's part-2 run): the default shape's plan, with the
    measured allocator slack, stays under its 8 GB target with the basis on disk, and not in RAM."""
    from w2w.fit_plan import GB, FitPlan, choose

    plan = choose(FitPlan(64974, 99648, 10000, default_block(10000, 16), DEPTH, 384, base=int(0.35 * GB)), None, 8.0)
    assert plan.out_of_core and plan.m == 16750
    assert plan.guarded() < 8 * GB < plan.guarded(False)


def test_map_in_process_prepares_every_row_once_read_in_chunks_or_ahead(tmp_path, monkeypatch):
    """prepare runs on every row once, before fn, on a scratch block; a block read in line is read by chunks
    (each prepared as it comes), one read ahead on the thread whole; the read-ahead rule is unchanged."""
    if not hasattr(resource, "RUSAGE_THREAD"):
        pytest.skip("no per-thread block-input count here: every read is made ahead")
    monkeypatch.setattr(subspace, "CHUNK_BYTES", 2 * 4096 * 4)  # chunks of 2 rows
    X = np.random.default_rng(0).standard_normal((80, 4096)).astype(np.float32)
    path = tmp_path / "x.f32"
    with open(path, "wb") as f:
        f.write(X.tobytes())
        f.flush()
        os.fsync(f.fileno())
    source = FromDisk(path, 80, 4096, 8)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_inblock
    source.load_into((0, 8), np.empty((8, 4096), dtype=np.float32))
    if resource.getrusage(resource.RUSAGE_THREAD).ru_inblock == before:
        pytest.skip(f"{tmp_path} reads without block input (a memory file system)")
    widths: list[tuple[int, int]] = []
    load_into = source.load_into
    source.load_into = lambda spec, out: (widths.append(spec), load_into(spec, out))[1]
    seen = np.zeros(80, dtype=int)
    parts: set[int] = set()

    def prepare(rows, part):
        parts.add(part)
        rows *= -1  # in place: the block handed to fn is the prepared one

    def fn(spec, W):
        seen[spec[0] : spec[1]] += 1
        return W.copy()

    got = np.vstack(list(map_in_process(fn, source, source.specs(), prepare=prepare)))
    np.testing.assert_array_equal(got, -X)  # every row prepared exactly once
    assert parts <= set(range(subspace.read_threads())) and parts
    whole = [lo for lo, hi in widths if hi - lo == 8]
    assert whole == list(range(8, 80, 16))  # the odd blocks, read ahead after an even block's storage read
    assert all(hi - lo <= 2 for lo, hi in widths if lo // 8 % 2 == 0)  # even blocks: in chunks, in line


@pytest.mark.parametrize("source_cls", [ArraySource, Buffered])
def test_a_prepared_pass_never_changes_the_callers_array(offset_data, source_cls):
    X = offset_data
    source = source_cls(X.copy(), 64)
    out = list(map_in_process(lambda spec, W: W.sum(), source, source.specs(), prepare=lambda r, p: r.fill(0)))
    assert out == [0.0] * 8
    np.testing.assert_array_equal(source.X, X)


class Counted(ArraySource):
    """An in-memory source that counts the blocks handed out in place."""

    def __init__(self, X, rows):
        super().__init__(X, rows)
        self.views = 0

    def view(self, spec):
        self.views += 1
        return super().view(spec)


def test_only_the_stats_pass_uses_blocks_in_place(offset_data):
    """The stats pass reads every block where it lies (its sketch is of the data as stored, its moments only
    read); a Gram pass copies and centers every block (uncentered products lose digits with |mean| / std, up
    to 51 here), and stays as exact as the dense product. Neither changes the source's array."""
    X = offset_data
    source = Counted(X.copy(), 64)
    n, mean, m2, _, _ = stats_in_place(source, source.specs(), 5, 12)
    assert source.views == 8  # 7 blocks of 64 rows and one of 52, none copied
    np.testing.assert_allclose(m2, ((X.astype(np.float64) - X.mean(0, dtype=np.float64)) ** 2).sum(0), rtol=1e-5)
    G = np.linalg.qr(np.random.default_rng(1).standard_normal((600, 24)))[0].astype(np.float32)
    mean, std = mean.astype(np.float32), np.sqrt(m2 / (n - 1)).astype(np.float32)
    P = gram_in_place(source, source.specs(), mean, std, G)
    assert source.views == 8  # no more
    Z = (X.astype(np.float64) - mean) / std
    exact = Z.T @ (Z @ G.astype(np.float64))
    np.testing.assert_allclose(P, exact, atol=1e-4 * np.abs(exact).max())
    np.testing.assert_array_equal(source.X, X)


def test_a_pass_over_a_mapped_file_hands_its_pages_back(tmp_path):
    """Blocks seen through a memory map are used where they lie (no buffer is made) and their pages leave the
    resident set once used: a stats pass over a 16 MB file ends with at most a block's pages mapped."""
    from tests.helpers import mapped_kb

    X = np.random.default_rng(0).standard_normal((256, 16384)).astype(np.float32)  # 16 MB, blocks of 2 MB
    path = tmp_path / "x.f32"
    X.tofile(path)

    class Mapped(ArraySource):
        def load(self, spec):
            assert spec[1] - spec[0] <= 16, "a block was copied"  # only the 16 rows that set the moments' shift
            return super().load(spec)

    source = Mapped(np.memmap(path, dtype=np.float32, mode="r", shape=X.shape), 32)
    n, mean, m2, sketch, _ = stats_in_place(source, source.specs(), 0, 8)
    assert n == 256
    np.testing.assert_allclose(mean, X.mean(0, dtype=np.float64), atol=1e-6)
    np.testing.assert_allclose(m2, ((X.astype(np.float64) - X.mean(0)) ** 2).sum(0), rtol=1e-5)
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps here")
    # mapped, every block's pages were resident once; handed back, the few at blocks' edges stay (a block is
    # 2 MB, a page-aligned boundary every 64 kB row pair: nothing is left but the 16 head rows read by load)
    assert mapped_kb(path) <= 1024, mapped_kb(path)


def test_a_registry_store_hands_out_runs_of_rows_in_place(tmp_path):
    """StoreSource.view maps a block of consecutive rows of one shard; any other block is read (copied), and a
    fit over the store equals a fit over the same rows in memory."""
    from registry.vectors import VectorStore
    from registry.wspace import StoreSource

    rng = np.random.default_rng(2)
    X = (rng.standard_normal((200, 40)) @ rng.standard_normal((40, 512))).astype(np.float32)
    store = VectorStore(tmp_path / "v", 512, 48)
    store.write_rows(0, X)
    source = StoreSource(store, np.arange(200), block_rows=32)
    inside, across = source.view((0, 32)), source.view((32, 64))  # rows 32..63 cross the shard boundary at 48
    assert across is None and not inside.flags.writeable
    np.testing.assert_array_equal(inside, X[:32])
    assert StoreSource(store, np.array([0, 2, 3]), 32).view((0, 3)) is None  # not consecutive
    perm = rng.permutation(200)
    np.testing.assert_array_equal(store.read(perm), X[perm])  # rows in any order, across shards
    np.testing.assert_array_equal(store.read(np.arange(50, 90)), X[50:90])  # runs, across a shard boundary
    cfg = FitConfig(components=10)
    got, want = fit(source, cfg), fit(ArraySource(X.copy(), 32), cfg)
    np.testing.assert_allclose(got.singular_values, want.singular_values, rtol=1e-5)
