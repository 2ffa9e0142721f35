"""The w2w space: z-scored PCA of model vectors, fitted out of core.

Fit (w2w-method.md): z-score every column (mean and std over models), then keep the top-k right
singular vectors V of the standardized N x D matrix Z. project: c = ((w - mean) / std) @ V;
reconstruct: w = (c @ V^T) * std + mean.

Z is never built. Data arrive as row blocks from a `BlockSource`, and every pass is a sum over blocks:
  stats pass:  count, mean, M2 per column (Chan et al.'s parallel merge, float64), and Z^T Omega
  Gram pass:   P = Z^T (Z G) for a D x l basis G, i.e. sum_b Z_b^T (Z_b G), and Y = Z G on the way
A pass is therefore embarrassingly parallel (a Dask map + sum, see registry/distributed.py) and its memory
is O(D * l), whatever N is (with the Y's kept: + N m in RAM, or on disk with the basis).

The solver is a randomized block Krylov method with full reorthogonalization: G_0 = orth(Z^T Omega) for a
Gaussian N x l Omega, G_{i+1} = orth(P_i minus its part in G_0..G_i), and the Rayleigh-Ritz step on the
Krylov basis K = [G_0 .. G_q] uses the products already computed (M = K^T Z^T Z K = K^T P), so q + 1
Gram passes give a (q + 1) * l dimensional search space. The last pass is half of one: M's last block
column is (Z K)^T (Z G_q), from the Y's of the passes, so Z^T (Z G_q) is never made. Compared with subspace
iteration (torch.svd_lowrank), keeping every iterate gives the same accuracy with a smaller block: fewer
flops per pass for the same k. When the Krylov space is at least as large as the data's rank the result is
exact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from w2w.blas import gemm
from w2w.errors import W2WError
from w2w.fit_plan import FitPlan, choose, rss_bytes
from w2w.formats.pages import give_back, populate
from w2w.krylov_basis import KrylovBasis
from w2w.rayleigh_ritz import ritz

STD_FLOOR = 1e-8  # columns whose std is below this are constant: they carry no information
SUBSPACE_FILE = "subspace.safetensors"  # a saved subspace's arrays (meta.json beside it holds the rest)


class SubspaceError(W2WError, ValueError):
    pass


class BlockSource(Protocol):
    """Row blocks of an N x D float32 matrix, addressed by picklable specs (so Dask can ship them).

    A spec is a tuple whose last two entries are the block's global row range (lo, hi). A source may also
    have `load_into(spec, out) -> out`, filling a (b, D) float32 array it is given: a pass in this process
    then reads into two reused buffers instead of a fresh array per block. And it may have
    `view(spec) -> array | None`: the block's rows as they lie in memory or in a memory-mapped file
    (read-only, float32, C-ordered), or None where they do not lie together: a pass that only reads its
    blocks then uses them where they are, without a copy (map_in_process, `views`).
    """

    n: int
    dim: int

    def specs(self) -> list[Any]: ...

    def load(self, spec: Any) -> np.ndarray: ...  # (b, D) float32


class ArraySource:
    """A BlockSource over an in-memory (or memory-mapped) array, for tests and small data."""

    def __init__(self, X: np.ndarray, block_rows: int = 1024):
        self.X, self.block_rows = X, block_rows
        self.n, self.dim = X.shape

    def specs(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.block_rows, self.n)) for lo in range(0, self.n, self.block_rows)]

    def load(self, spec: tuple[int, int]) -> np.ndarray:
        return np.asarray(self.X[spec[0] : spec[1]], dtype=np.float32)

    def view(self, spec: tuple[int, int]) -> np.ndarray | None:
        rows = self.X[spec[0] : spec[1]]
        return rows if rows.dtype == np.float32 and rows.flags.c_contiguous else None


# A pass maps fn(*shared, spec, block) over every block and yields the results in block order.
# `shared` holds the large read-only inputs (mean, std, a D x l basis): a distributed mapper sends them
# to each worker once instead of once per block.
MapBlocks = Callable[[Callable[..., Any], BlockSource, list[Any], tuple], Iterable[Any]]


def read_threads() -> int:
    """Threads that read and prepare a block in line: one per core this process may use (at most 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# Rows read and prepared at a time: a chunk (and a prepare's scratch of the same size) stays in a core's L2
# cache (1 MB a core on this machine kind), so the prepare finds it there instead of in memory.
CHUNK_BYTES = 1 << 19
# Rows prepared at a time in a block used where it lies (nothing to read into cache first): larger chunks
# make fewer calls (prepare's Python overhead, not the data, set the time at one row a call)
VIEW_CHUNK_BYTES = 1 << 22


def map_in_process(
    fn: Callable[..., Any],
    source: BlockSource,
    specs: list[Any],
    shared: tuple = (),
    prepare: Callable[[np.ndarray, int], None] | None = None,
    views: bool = False,
) -> Iterable[Any]:
    """Run a pass here, reading block i+1 on a thread while block i is computed when reading waits.

    A read that waits (for the disk) goes on the thread, where the wait overlaps the products; a read that
    computes (a copy from the page cache) runs in line, where it does not take a core from BLAS: on 2 cores
    a copy on the thread slowed a 2-thread product by more than the copy itself (bench/profile_fit.py).
    Whether a read went to storage is what its thread's block-input count says (getrusage, Linux): its wall
    clock is no sign, since a copy competing with BLAS threads takes longer too. Elsewhere every read is
    made ahead on the thread.

    With `source.load_into`, blocks go into reused buffers (fn may change its block in place; a result of
    fn must not be a view of it): a fresh 150 MB array per block cost ~70 ms of page faults here, 4x the
    read itself, on a core the products need. A block read in line goes into the buffer the last block
    used (one buffer ran the Gram pass ~5% faster than two in turn: the one just used is partly in cache);
    a block read on the thread goes into the other one.

    `prepare(rows, part)` runs on every block before fn, over chunks of its rows, by read_threads() threads
    (`part` numbers the thread: prepare may keep a scratch and sums per part); it may change the rows (the
    block is then a copy when the source's is not scratch). A block read in line is read by those threads
    a chunk at a time, each chunk prepared as soon as it is read, while it is still in the core's cache:
    the pass's element-wise work (centering, column moments) then costs about what the copy does.

    With `views` a block the source has in place (`source.view`) is handed to prepare and fn read-only (they
    tell it from a buffer by flags.writeable, and leave it as it is) and used there: no copy out of the page
    cache, which on 2 cores takes time from the products, and no buffers. Its pages are mapped in one call
    first (w2w.formats.pages.populate) and handed back once it is used (give_back), so the resident set holds
    one block of them instead of two buffers. A view that had to be read from storage (the block input count
    of the whole process: populate reads in the caller's thread) sends the next block to the thread as
    above, where the wait overlaps the products; the block after a read that did not wait is a view again.
    """
    import resource
    from concurrent.futures import ThreadPoolExecutor

    if not specs:
        return
    buffers: dict[int, list[np.ndarray]] = {}

    def buffer(spec: Any, other: bool) -> np.ndarray:
        b = spec[-1] - spec[-2]
        if b not in buffers:
            buffers[b] = [np.empty((b, source.dim), dtype=np.float32)]
        bufs = buffers[b]  # bufs[0]: the last one filled
        if other:  # the block in use stays where it is
            if len(bufs) == 1:
                bufs.append(np.empty_like(bufs[0]))
            bufs.reverse()
        return bufs[0]

    def read(spec: Any, other: bool) -> np.ndarray:
        if not hasattr(source, "load_into"):
            return source.load(spec)
        return source.load_into(spec, buffer(spec, other))

    counted = hasattr(resource, "RUSAGE_THREAD")
    waits = [not counted]

    def inblock(who: int = getattr(resource, "RUSAGE_THREAD", 0)) -> int:
        return resource.getrusage(who).ru_inblock if counted else 0

    def stored(before: int, nbytes: int, who: int = getattr(resource, "RUSAGE_THREAD", 0)) -> bool:
        """Whether more than an eighth of nbytes came from storage since `before` (inblock counts 512-byte
        units): a few pages that the kernel's proactive reclaim (DAMON runs on this machine kind) took from the
        page cache do not make a block worth reading ahead (it cost a second buffer, and a core, for nothing)."""
        return not counted or (inblock(who) - before) * 512 > nbytes / 8

    def load(spec: Any, other: bool) -> np.ndarray:
        before = inblock()
        block = read(spec, other)
        waits[0] = stored(before, block.nbytes)  # it read from storage
        return block

    parts = read_threads()

    def in_parts(spec: Any, block: np.ndarray, fill: bool, chunk: int = CHUNK_BYTES) -> bool:
        """prepare over the block by chunks on `parts` threads, each chunk first read into it when `fill`;
        whether a read went to storage."""
        lo, b = spec[-2], block.shape[0]
        step = max(1, chunk // max(1, block[:1].nbytes))
        bounds = [b * p // parts for p in range(parts + 1)]

        def work(part: int) -> bool:
            before = inblock()
            for i in range(bounds[part], bounds[part + 1], step):
                rows = block[i : min(i + step, bounds[part + 1])]
                if fill:
                    source.load_into((*spec[:-2], lo + i, lo + i + len(rows)), rows)
                prepare(rows, part)
            return stored(before, (bounds[part + 1] - bounds[part]) * block[:1].nbytes)

        return any(list(workers.map(work, range(parts))))

    def prepared(spec: Any, block: np.ndarray) -> np.ndarray:
        block = block if _scratch(block) else block.copy()
        in_parts(spec, block, fill=False)
        return block

    def in_place(spec: Any, view: np.ndarray) -> Any:
        """fn over a block where it lies; sets waits[0]."""
        before = inblock(resource.RUSAGE_SELF)
        populate(view)
        if prepare:
            in_parts(spec, view, fill=False, chunk=VIEW_CHUNK_BYTES)
        out = fn(*shared, spec, view)
        waits[0] = stored(before, view.nbytes, resource.RUSAGE_SELF)
        give_back(view)
        return out

    views = views and hasattr(source, "view")
    with ThreadPoolExecutor(max_workers=1) as pool, ThreadPoolExecutor(max_workers=parts) as workers:
        nxt = None
        for i, spec in enumerate(specs):
            view = source.view(spec) if views and nxt is None else None
            if view is not None:
                view = view.view()
                view.flags.writeable = False  # fn and prepare tell a view from a buffer by this
                out = in_place(spec, view)
                del view
                nxt = pool.submit(load, specs[i + 1], True) if waits[0] and i + 1 < len(specs) else None
                yield out
                continue
            if nxt is None and prepare and hasattr(source, "load_into"):  # read and prepared by chunks
                block = buffer(spec, False)
                waits[0] = in_parts(spec, block, fill=True)
            else:
                block = nxt.result() if nxt is not None else load(spec, False)
                block = prepared(spec, block) if prepare else block
            nxt = pool.submit(load, specs[i + 1], True) if waits[0] and i + 1 < len(specs) else None
            yield fn(*shared, spec, block)


# --- the per-block work (module-level functions, so they pickle for Dask) ---------------------------


def sketch_rows(seed: int, spec: Any, l: int) -> np.ndarray:
    """The rows lo..hi of the N x l Gaussian test matrix, generated from (seed, lo) alone."""
    lo, hi = spec[-2], spec[-1]
    return np.random.default_rng((seed, lo)).standard_normal((hi - lo, l)).astype(np.float32)


def block_moments(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, M2) of a block's columns in float64, each in one read of the block (W is overwritten when it
    is scratch, see _scratch).

    A float32 mean by BLAS (W^T 1 / b), then the float64 sum of the deviations from it (small: their float32
    rounding is of their own size) corrects it to the block's mean within u |w - mean|, and M2 is taken
    about it. A float64 column sum of the block took as long as both (0.4 s per 8,192 rows at D = 99,648).
    """
    from scipy.linalg.blas import sgemv

    b = W.shape[0]
    approx = sgemv(1.0 / b, W.T, np.ones(b, dtype=np.float32))  # (D,) float32
    dev = W if _scratch(W) else np.empty_like(W)
    np.subtract(W, approx, out=dev)  # (b, D)
    r = dev.sum(axis=0).astype(np.float64)  # sum of (w - approx) = b (mean - approx)
    # sum (w - mean)^2 = sum (w - approx)^2 - r^2 / b; each square summed in float32 over the b rows: a sum of
    # positive terms, so within b u (2e-5 at b = 384) of exact, typically sqrt(b) u; blocks are merged in float64
    m2 = np.einsum("ij,ij->j", dev, dev).astype(np.float64) - r**2 / b
    return approx.astype(np.float64) + r / b, np.maximum(m2, 0.0)


def block_stats(seed: int, l: int, spec: Any, W: np.ndarray):
    """(count, mean, M2, (W_b^T Omega_b)^T, colsum of Omega_b) of one block: the stats pass also sketches."""
    omega = sketch_rows(seed, spec, l)  # (b, l)
    sketch_t = np.ascontiguousarray(omega.T) @ W  # (l, D): see block_gram; before W is overwritten
    return (W.shape[0], *block_moments(W), sketch_t, omega.sum(axis=0))


def merge_stats(parts: Iterable[tuple]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise update: exact and stable whatever the block sizes. Sketches add up."""
    n, mean, m2, sk, osum = 0, None, None, None, None
    for nb, mb, m2b, skb, ob in parts:
        if mean is None:
            n, mean, m2, osum = nb, mb.copy(), m2b.copy(), ob.copy()
            sk = None if skb is None else skb.copy()
            continue
        if skb is not None:
            sk += skb
        osum += ob
        delta = mb - mean
        tot = n + nb
        mean += delta * (nb / tot)
        m2 += m2b + delta**2 * (n * nb / tot)
        n = tot
    if mean is None:
        raise SubspaceError("no models to fit on")
    return n, mean, m2, sk, osum


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(X - mean) / std as a new array."""
    Z = X - mean  # (b, D) float32
    Z /= std
    return Z


def _scratch(W: np.ndarray) -> bool:
    """Whether a block may be overwritten: one a source made for this pass alone (a fresh array, or a buffer
    of map_in_process), not a view of someone else's array. In place saves a 100+ MB array's page faults."""
    return W.flags.writeable and W.flags.owndata


def _standardize_block(W: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """standardize() in place when the block is scratch (_scratch), else on a copy."""
    Z = W if _scratch(W) else W.copy()  # (b, D) float32
    Z -= mean
    Z /= std
    return Z


def block_gram(mean: np.ndarray, std: np.ndarray, G: np.ndarray, spec: Any, W: np.ndarray) -> tuple:
    """(Z_b G (b, l), (Z_b^T Z_b G)^T (l, D)) of one block: the per-block terms of a Gram pass run by a
    distributed mapper."""
    Z = _standardize_block(W, mean, std)  # (b, D)
    Y = Z @ G  # (b, l)
    # (Z^T Y)^T as Y^T Z: OpenBLAS ran this layout ~1.2x faster than Z.T @ Y at b = 384, D = 99,648, l = 216
    return Y, np.ascontiguousarray(Y.T) @ Z  # (l, D)


def block_project(mean: np.ndarray, std: np.ndarray, G: np.ndarray, spec: Any, W: np.ndarray) -> np.ndarray:
    """Z_b G (b, l) of one block: the last Gram pass's only term (see fit)."""
    return _standardize_block(W, mean, std) @ G


def gram_in_place(
    source: BlockSource,
    specs: list[Any],
    mean: np.ndarray,
    std: np.ndarray,
    G: np.ndarray,
    Y: Any = None,
    full: bool = True,
) -> np.ndarray | None:
    """Z^T Z G (D, l) float32, C-ordered, in this process, with two fewer passes over each block than
    block_gram; Z G (n, l) goes into Y's rows on the way (`Y[lo:hi] = rows`: an array, or a
    KrylovBasis.new_block on disk). Without `full`, Z G alone (None is returned): half the flops.

    Each block is standardized as it is read (map_in_process's prepare: a chunk at a time, in cache, on every
    core, so it costs no pass of its own over the block), and every block's Z_b^T (Z_b G) is added into one
    sum by BLAS itself (w2w.blas.gemm with beta = 1, numpy's BLAS) instead of being made as a new (D, l) array
    and then added. G is only read: no D x l array beside it and the sum (an earlier version scaled G by
    1/std instead of the block, which took a copy of G in RAM).

    Blocks are always copied here, never used where they lie (map_in_process's `views`): uncentered, the
    products' float32 rounding grows with |mean| / std (1 + |mean| / std times the centered product's), and
    real LoRA columns lie many spreads from 0; the copy is centered exactly (w - mean is exact where w is near
    mean). Measured: one Gram pass over 8,192 mapped rows uncentered ~8% faster, a whole fit not measurably.
    """
    G = np.ascontiguousarray(G, dtype=np.float32)
    P = np.zeros(G.shape, dtype=np.float32) if full else None  # (D, l)
    in_ram = isinstance(Y, np.ndarray) and Y.flags.c_contiguous

    def standardize_rows(rows: np.ndarray, _: int) -> None:
        rows -= mean
        rows /= std  # as standardize() does: a projection later sees the same Z

    def add_block(spec: Any, Z: np.ndarray) -> None:  # Z: the block, standardized by map_in_process
        lo, hi = spec[-2], spec[-1]
        Yb = gemm(Z, G, Y[lo:hi] if in_ram else None)
        if Y is not None and not in_ram:
            Y[lo:hi] = Yb
        if P is not None:
            gemm(Z, Yb, P, trans_a=True, beta=1.0)  # P += Z^T (Z G) in P's buffer

    for _ in map_in_process(add_block, source, specs, prepare=standardize_rows):
        pass
    return P


def mapped_gram(map_blocks: MapBlocks) -> Callable[..., np.ndarray | None]:
    """gram_in_place from block_gram (or block_project) over `map_blocks` (e.g. Dask): the blocks' Z_b G
    put in their rows of Y, their products summed in block order."""

    def gram(source: BlockSource, specs: list[Any], mean: np.ndarray, std: np.ndarray, G: np.ndarray,
             Y: Any = None, full: bool = True) -> np.ndarray | None:  # fmt: skip
        Pt = None  # P^T (l, D)
        parts = map_blocks(block_gram if full else block_project, source, specs, (mean, std, G))
        for spec, part in zip(specs, parts, strict=True):
            Yb, Pb = part if full else (part, None)
            if Y is not None:
                Y[spec[-2] : spec[-1]] = Yb
            if Pb is not None:
                Pt = Pb.astype(np.float32, copy=True) if Pt is None else Pt.__iadd__(Pb)
        return None if Pt is None else np.ascontiguousarray(Pt.T)

    return gram


TILE_BYTES = 1 << 21  # ColumnMoments' deviations of a chunk's rows, a range of columns at a time


class ColumnMoments:
    """Column sums of a block's deviations from a shift and of their squares, added a chunk of rows at a time
    by several threads (a part each: map_in_process's prepare), then taken as the block's (mean, M2).

    The shift is the previous block's mean (the first block's: the mean of its first rows), so deviations
    are of the data's own spread: each is rounded by u of its size, their float32 sums (over a part's rows)
    carry no cancellation, and M2 = sum d^2 - (sum d)^2 / b loses nothing to a large mean. One read of the
    block, in cache, instead of block_moments' three (sgemv, subtract, sums) from memory.
    """

    def __init__(self, dim: int, parts: int, shift: np.ndarray):
        self.shift = np.asarray(shift, dtype=np.float32)
        self.sums = np.zeros((parts, 2, dim), dtype=np.float32)  # per part: sum d, sum d^2
        self.scratch: list[np.ndarray | None] = [None] * parts

    def add(self, rows: np.ndarray, part: int) -> None:
        r, dim = rows.shape
        width = min(dim, max(4096, TILE_BYTES // (4 * r)))  # columns at a time: the deviations stay in cache
        d = self.scratch[part]
        if d is None or d.size < r * width:
            d = self.scratch[part] = np.empty(r * width, dtype=np.float32)
        s, q = self.sums[part]
        for c in range(0, dim, width):
            w = min(width, dim - c)
            dev = d[: r * w].reshape(r, w)
            np.subtract(rows[:, c : c + w], self.shift[c : c + w], out=dev)
            s[c : c + w] += dev[0] if r == 1 else np.add.reduce(dev, axis=0)
            np.multiply(dev, dev, out=dev)
            q[c : c + w] += dev[0] if r == 1 else np.add.reduce(dev, axis=0)

    def take(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, M2) in float64 of the b rows added since the last take; the next block is shifted by it."""
        s, q = self.sums.astype(np.float64).sum(axis=0)
        self.sums[...] = 0.0
        mean = self.shift + s / b
        m2 = np.maximum(q - s * s / b, 0.0)
        self.shift = mean.astype(np.float32)
        return mean, m2


def stats_in_place(source: BlockSource, specs: list[Any], seed: int, l: int) -> tuple:
    """merge_stats(block_stats of every block) in this process, the sketch summed in place by BLAS.

    The same (count, mean, M2, sketch, colsum of Omega) with the sketch (l, D) a view of one Fortran-ordered
    sum that every block's Omega_b^T W_b is added into (w2w.blas.gemm, beta = 1): block_stats made a new (l, D)
    array per block and merge_stats added it, which cost as much as the product itself at l = 350.
    The column moments are summed as the block is read (ColumnMoments, map_in_process's prepare).
    The sketch is Fortran-ordered, so its transpose is C-ordered (D, l): the fit's start block is made
    from it in place.
    """
    sk = np.zeros((l, source.dim), dtype=np.float32, order="F")  # (l, D)
    if not specs:
        raise SubspaceError("no models to fit on")
    first = specs[0]
    head = source.load((*first[:-2], first[-2], min(first[-1], first[-2] + 16)))
    moments = ColumnMoments(source.dim, read_threads(), head.mean(axis=0, dtype=np.float64))

    def add_block(spec: Any, W: np.ndarray) -> tuple:
        omega = sketch_rows(seed, spec, l)  # (b, l)
        gemm(omega, W, sk, trans_a=True, beta=1.0)  # += Omega_b^T W_b, W read where it lies
        return (W.shape[0], *moments.take(W.shape[0]), None, omega.sum(axis=0))

    # merged as they come (merge_stats consumes the pass lazily): two D-vectors alive, not one per block;
    # the sketch is of the data as stored (fit() centers and scales it after), so blocks are read in place
    blocks = map_in_process(add_block, source, specs, prepare=moments.add, views=True)
    n, mean, m2, _, omega_sum = merge_stats(blocks)
    return n, mean, m2, sk, omega_sum


# --- the subspace -----------------------------------------------------------------------------------


# The default Krylov shape: DEPTH blocks of k / SPLIT + oversample columns, a space of ~1.7 k dimensions.
# The tail of the top k converges with the space's dimension m, not with the number of blocks (README, "The
# w2w space": bench/sweep_fit_accuracy.py at N = 4,096, a slowly decaying spectrum): 7 blocks of k/5
# (m = 1.5 k, 8 passes) left it less accurate than torch.svd_lowrank(q = k + 24, niter = 2); 5 blocks of
# k/3 (6 passes, the same as torch's, and ~0.6x its product flops) beat it. 4 blocks of k/2 (5 passes)
# do too, for 1.2x the flops, and at k = 10,000 their 5,016-column blocks would not fit in 8 GB.
DEPTH, SPLIT = 5, 3


# Above this many rows the exact path (one D x N block) is not taken for a Krylov space as large as the
# data: fewer blocks are (its D x N arrays are 0.2 GB each at D = 99,648 here, 6.5 GB at N = 16,384).
EXACT_ROWS = 512


def default_block(k: int, oversample: int) -> int:
    """The default Krylov block size l for k components."""
    return -(-k // SPLIT) + oversample


@dataclass
class FitConfig:
    components: int = 1000
    block: int | None = None  # Krylov block size l; default ceil(k / SPLIT) + oversample
    depth: int = DEPTH  # Krylov blocks = Gram passes (bench/sweep_fit_accuracy.py measures the trade-off)
    oversample: int = 16
    seed: int = 0
    max_memory_gb: float | None = None  # a budget for the fit's peak RSS: above it the basis goes to disk
    out_of_core: bool | None = None  # force the Krylov basis on disk (True) or in RAM (False)
    workdir: str | None = None  # where the on-disk basis lives (unlinked temporary files); default: TMPDIR
    device: str | None = None  # the Gram products in torch on this device ("cpu", "cuda"); None: numpy


@dataclass
class Subspace:
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,) with constant columns set to 1
    components: np.ndarray  # (D, k), orthonormal columns
    singular_values: np.ndarray  # (k,)
    total_variance: float  # sum of squares of Z / (N - 1): the denominator of explained_variance_ratio
    n_models: int
    model_ids: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.components.shape[1]

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @property
    def explained_variance(self) -> np.ndarray:
        return self.singular_values.astype(np.float64) ** 2 / max(self.n_models - 1, 1)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / max(self.total_variance, 1e-30)

    def project(self, W: np.ndarray, k: int | None = None) -> np.ndarray:
        """Coefficients of vectors (n, D) or (D,) -> (n, k) or (k,)."""
        V = self.components[:, : k or self.k]
        return standardize(np.asarray(W, dtype=np.float32), self.mean, self.std) @ V

    def reconstruct(self, C: np.ndarray) -> np.ndarray:
        """Vectors from coefficients (n, k') or (k',), using the first k' components."""
        C = np.asarray(C, dtype=np.float32)
        V = self.components[:, : C.shape[-1]]
        return (C @ V.T) * self.std + self.mean

    def relative_error(self, W: np.ndarray) -> np.ndarray:
        """||w - reconstruct(project(w))|| / ||w - mean||, measured in standardized units."""
        W = np.atleast_2d(np.asarray(W, dtype=np.float32))
        Z = standardize(W, self.mean, self.std)
        resid = Z - (Z @ self.components) @ self.components.T
        return np.linalg.norm(resid, axis=1) / np.maximum(np.linalg.norm(Z, axis=1), 1e-30)

    # --- files: safetensors for arrays, JSON for the rest ------------------------------------------

    def save(self, folder: Path, meta: dict | None = None) -> None:
        from w2w.formats.tensorfile import atomic_write_bytes, atomic_write_safetensors

        folder = Path(folder)
        arrays = {
            "mean": self.mean.astype(np.float32),
            "std": self.std.astype(np.float32),
            "components": np.ascontiguousarray(self.components, dtype=np.float32),
            "singular_values": self.singular_values.astype(np.float64),
            "model_ids": np.asarray(self.model_ids, dtype=np.int64),
        }
        info = {
            "k": self.k,
            "dim": self.dim,
            "n_models": self.n_models,
            "total_variance": self.total_variance,
            "explained_variance_ratio_sum": float(self.explained_variance_ratio.sum()),
            "config": self.config,
            **(meta or {}),
        }
        atomic_write_safetensors(folder / SUBSPACE_FILE, arrays)  # no in-memory copy of the components
        atomic_write_bytes(folder / "meta.json", (json.dumps(info, indent=2) + "\n").encode())

    def map_components(self, folder: Path) -> None:
        """Replace the components by a read-only memory map of those saved in folder (by save): their memory is
        freed unless held elsewhere, and what is read of the file stays page cache, which the OS may reclaim
        and w2w.formats.pages.give_back hands back (at k = 10,000 the components are 4 GB)."""
        from w2w.formats.tensorfile import map_safetensors

        mapped = map_safetensors(Path(folder) / SUBSPACE_FILE)["components"]
        if mapped.shape != self.components.shape:
            raise SubspaceError(f"{folder}: holds components {mapped.shape}, not {self.components.shape}")
        self.components = mapped

    @classmethod
    def load(cls, folder: Path) -> Subspace:
        """The subspace saved in folder; its components a read-only memory map of the file (map_components)."""
        from w2w.errors import CorruptFileError
        from w2w.formats.tensorfile import map_safetensors

        folder = Path(folder)
        path = folder / SUBSPACE_FILE
        try:
            first = map_safetensors(path)
            small = {key: np.array(first[key]) for key in ("mean", "std", "singular_values", "model_ids")}
            del first  # its map closes: the small arrays' pages are not kept mapped beside the components'
            components = map_safetensors(path)["components"]  # a map of its own, read where used
            info = json.loads((folder / "meta.json").read_text())
        except (CorruptFileError, OSError, ValueError, KeyError) as e:
            raise SubspaceError(
                f"{folder}: the subspace's files cannot be read ({e}); run `w2wreg verify`, then fit again"
            ) from None
        return cls(
            small["mean"],
            small["std"],
            components,
            small["singular_values"],
            info["total_variance"],
            info["n_models"],
            small["model_ids"].tolist(),
            info.get("config", {}),
        )


def _orth(A: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    """An orthonormal basis of A's columns (D, l) -> (D, l'), dropping directions A does not really span.
    A (C-ordered) is overwritten: its buffer is the result unless a direction is dropped.

    Through the l x l Gram matrix, twice ("twice is enough"): LAPACK's QR of a tall float32 matrix is
    ~50x slower here than the Gram product, and this also handles rank deficiency.
    """
    Q = A
    for _ in range(2):
        G = Q.T.astype(np.float64) @ Q.astype(np.float64) if Q.shape[1] <= 64 else (Q.T @ Q).astype(np.float64)
        evals, evecs = np.linalg.eigh(G)
        keep = evals > (rtol**2) * max(evals.max(initial=0.0), 1e-300)
        Q = _right_multiply(Q, (evecs[:, keep] / np.sqrt(evals[keep])).astype(np.float32))
    return Q


def _right_multiply(Q: np.ndarray, T: np.ndarray, rows: int = 8192) -> np.ndarray:
    """Q @ T for Q (D, l) C-ordered and T (l, l'): in Q's buffer, a row chunk at a time, when l' = l (no
    second D x l array: at k = 10,000 one is 1.3 GB), else as a new array."""
    if T.shape[1] != Q.shape[1] or not Q.flags.c_contiguous:
        return Q @ T
    for lo in range(0, Q.shape[0], rows):
        Q[lo : lo + rows] = Q[lo : lo + rows] @ T
    return Q


def _gram64(G: np.ndarray, rows: int = 8192) -> np.ndarray:
    """G^T G (b, b) float64 for G (D, b) float32: float32 products of row chunks, summed in float64."""
    out = np.zeros((G.shape[1], G.shape[1]))
    for lo in range(0, G.shape[0], rows):
        c = G[lo : lo + rows]
        out += c.T @ c
    return out


def fit(
    source: BlockSource,
    config: FitConfig | None = None,
    model_ids: list[int] | None = None,
    map_blocks: MapBlocks | None = None,
    progress: Callable[[str], None] | None = None,
) -> Subspace:
    """Fit the w2w subspace of the rows of `source` with 1 stats pass and `depth` Gram passes.

    With `config.out_of_core` (or when the in-RAM estimate passes `config.max_memory_gb`) the Krylov basis
    and the components live on disk (w2w/krylov_basis.py, w2w/fit_plan.py): the components come back as a
    read-only memory map of an unlinked temporary file. With `config.device` every product (the stats pass,
    the Gram passes, the basis products) runs in torch on that device (w2w/device_pass.py); the final
    eigenproblem stays on the CPU."""
    cfg = config or FitConfig()
    map_blocks = map_blocks or map_in_process
    n, D = source.n, source.dim
    if n < 3:
        raise SubspaceError(f"a subspace needs at least 3 models, got {n}")
    k = min(cfg.components, n - 1, D)
    specs = source.specs()
    say = progress or (lambda _: None)

    depth = max(1, cfg.depth)
    l = cfg.block or default_block(k, cfg.oversample)
    if n > EXACT_ROWS and n > k + 32 and depth * l >= n and l < n / 2:
        # a Krylov space as large as the data, of many rows (N = 16,384 at k = 10,000): the exact path's
        # D x N blocks would not fit in memory, so fewer blocks make a space just under the data's rank
        depth = (n - 1) // l
    if n <= k + 32 or n <= depth * l:
        # small data: one block as large as the data's rank spans the whole row space, so the fit is exact
        # (and a Krylov space larger than the data would only add rounding noise)
        depth, l = 1, n
    l = max(1, min(l, D, n))
    rows = max((spec[-1] - spec[-2] for spec in specs), default=1)
    import scipy.linalg  # noqa: F401 (the final step's; imported before the plan so that it counts in its base)

    gram = gram_pass(cfg.device, map_blocks)  # before the plan: torch's import counts in its base too
    try:
        plan = choose(FitPlan(n, D, k, l, depth, rows, base=rss_bytes()), cfg.out_of_core, cfg.max_memory_gb)
    except ValueError as e:
        raise SubspaceError(str(e)) from None
    say(plan.describe())

    say("pass 1: column mean and std, and a sketch of the row space")
    if cfg.device is not None:
        from w2w.device_pass import torch_stats_pass

        stats = merge_stats(torch_stats_pass(source, specs, cfg.seed, l, cfg.device))
    elif map_blocks is map_in_process:
        stats = stats_in_place(source, specs, cfg.seed, l)
    else:
        stats = merge_stats(map_blocks(block_stats, source, specs, (cfg.seed, l)))
    n_seen, mean64, m2, sketch, omega_sum = stats
    del stats
    assert n_seen == n, f"blocks held {n_seen} rows, expected {n}"
    std64 = np.sqrt(m2 / max(n - 1, 1))
    std64[std64 < STD_FLOOR] = 1.0  # constant columns: centered they are 0, scaled by 1 they stay 0
    mean, std = mean64.astype(np.float32), std64.astype(np.float32)
    total_variance = float((m2 / std64**2).sum() / max(n - 1, 1))
    # Z^T Omega = S^-1 (W^T Omega - mean 1^T Omega): a start block inside Z's row space, for free; made in
    # the sketch's buffer (or a C-ordered copy of it) a row chunk at a time: no D x l float64 array
    start = np.ascontiguousarray(sketch.T, dtype=np.float32)  # (D, l)
    del sketch
    for lo in range(0, D, 8192):
        rows = slice(lo, lo + 8192)
        start[rows] = (start[rows] - np.outer(mean64[rows], omega_sum)) / std64[rows, None]
    G = _orth(start)  # (D, l), in start's buffer
    del start
    workdir = cfg.workdir or tempfile.gettempdir()
    folder = workdir if plan.out_of_core else None
    with KrylovBasis(D, depth * l, folder, cfg.device) as K, KrylovBasis(n, depth * l, folder, cfg.device) as ZK:
        # Only the upper block triangle of M = K^T Z^T Z K and S = K^T K is computed (both are symmetric),
        # one block column per Krylov block, so each product P_i is dropped as soon as the next block is
        # made from it: memory is K (or a chunk of it) plus a few D x l arrays, whatever the depth.
        # ZK = Z K (n x m, each pass's Z G_i, made on the way to P_i; beside K, in RAM or on disk) gives the
        # last block column as (Z K)^T (Z G_last), with no Z^T (Z G_last): the last pass is half a pass.
        cols: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(depth):
            last = i + 1 == depth
            say(f"pass {i + 2}: Gram products for Krylov block {i + 1}/{depth} (l = {G.shape[1]})"
                + (", Z G only" if last else ""))  # fmt: skip
            K.append(G)
            # S = K^T K's block column: above its diagonal block K^T G is rounding (G was orthogonalized
            # twice against K: K^T G ~ float32's eps), so only G^T G is computed, 2 D l^2 flops, not 2 D used l
            GtG = _gram64(G)
            P = gram(source, specs, mean, std, G, ZK.new_block(G.shape[1]), not last)  # (D, b) = Z^T Z G
            del G
            if last:
                cols.append((ZK.tdot_last(), GtG))  # M's block column, (Z K)^T (Z G)
                break
            (KtP,) = K.tdot(P)  # (used, b): M's block column
            cols.append((KtP, GtG))
            scale = np.linalg.norm(P, axis=0).max(initial=0.0)
            R = P  # made in place: the first Gram-Schmidt pass reuses K^T P from M
            K.subtract(R, KtP)
            K.subtract(R, K.tdot(R)[0])  # twice is enough (Kahan/Parlett) to keep K orthonormal in float32
            R[:, np.linalg.norm(R, axis=0) <= 1e-5 * max(scale, 1e-30)] = 0.0  # what K already spans
            del P
            G = np.ascontiguousarray(_orth(R))  # in R's buffer
            del R
            if G.shape[1] == 0:
                break  # the Krylov space is invariant: it already holds the whole row space
        P = G = KtP = None  # noqa: F841 (dropped before the m x m matrices are made)
        ZK.close()
        say(f"Rayleigh-Ritz on the {K.used}-dimensional Krylov space")
        blocks = [c[1] for c in cols]  # emptied by ritz, as cols by _assemble: neither is held beside M
        theta, Q, method = ritz(_assemble(cols, K.used), blocks, k, plan.ritz_driver)  # (k,), (used, k)
        # each component's entries sum to a positive number, so refits of the same data agree in sign
        # (1^T V = (1^T K) Q: the signs are known before V is made)
        signs = np.sign(K.colsum @ Q)
        signs[signs == 0] = 1
        Q *= signs
        say(f"components: V = K Q ({D:,} x {Q.shape[1]:,})")
        V = _components(K, Q, plan.out_of_core, workdir)
        del Q
    s = np.sqrt(np.maximum(theta, 0.0))
    config = asdict(cfg) | {"block": l, "depth": depth, "k": int(V.shape[1]), "out_of_core": plan.out_of_core}
    config["ritz"] = method
    return Subspace(mean, std, V, s, total_variance, n, list(model_ids or []), config)


def _assemble(cols: list[tuple[np.ndarray, np.ndarray]], m: int) -> np.ndarray:
    """M (m, m) float64 with its upper block triangle filled from the block columns, each column dropped
    as it is copied (np.zeros' pages are resident only once written: the columns and M are not all alive)."""
    M = np.zeros((m, m), dtype=np.float64)
    at = 0
    while cols:
        c = cols.pop(0)[0]
        M[: c.shape[0], at : at + c.shape[1]] = c
        at += c.shape[1]
        del c
    return M


def _components(K: KrylovBasis, Q: np.ndarray, on_disk: bool, workdir: str) -> np.ndarray:
    """V = K Q (D, k) float32: in RAM, or written chunk by chunk to an unlinked temporary file and returned
    as its read-only memory map (nothing of it is resident until read)."""
    D, k = K.dim, Q.shape[1]
    if not on_disk:
        V = np.empty((D, k), dtype=np.float32)
        K.times(Q, lambda lo, hi, rows: V.__setitem__(slice(lo, hi), rows))
        return V
    with tempfile.TemporaryFile(dir=workdir, prefix="components-") as f:
        K.times(Q, lambda lo, hi, rows: f.write(memoryview(np.ascontiguousarray(rows).reshape(-1)).cast("B")))
        f.flush()
        return np.memmap(f, dtype=np.float32, mode="r", shape=(D, k))  # the map outlives the closed file


def gram_pass(device: str | None, map_blocks: MapBlocks) -> Callable[..., np.ndarray | None]:
    """The Gram pass, P = Z^T Z G (D, l) float32, with Z G (n, l) written into Y's rows: numpy over
    `map_blocks` (in process or Dask), or torch on a device. Called as gram(source, specs, mean, std, G, Y,
    full); without `full` the pass makes Z G alone (half the flops) and returns None."""
    if device is not None:
        from w2w.device_pass import resolve_device, torch_gram_pass

        resolve_device(device)  # a device this machine lacks fails now, not after the first pass
        return lambda source, specs, mean, std, G, Y=None, full=True: torch_gram_pass(
            source, specs, mean, std, G, device, Y, full
        )
    if map_blocks is map_in_process:
        return gram_in_place
    return mapped_gram(map_blocks)
