"""The w2w space: z-scored PCA of model vectors, fitted out of core.

Fit (w2w-method.md): z-score every column (mean and std over models), then keep the top-k right
singular vectors V of the standardized N x D matrix Z. project: c = ((w - mean) / std) @ V;
reconstruct: w = (c @ V^T) * std + mean.

Z is never built. Data arrive as row blocks from a `BlockSource`, and every pass is a sum over blocks:
  stats pass:  count, mean, M2 per column (Chan et al.'s parallel merge, float64)
  Gram pass:   P = Z^T (Z G) for a D x l basis G, i.e. sum_b Z_b^T (Z_b G)
A pass is therefore embarrassingly parallel (a Dask map + sum, see registry/distributed.py) and its memory
is O(D * l), whatever N is.

The solver is a randomized block Krylov method with full reorthogonalization: G_0 is a random
orthonormal D x l basis, G_{i+1} = orth(P_i minus its part in G_0..G_i), and the Rayleigh-Ritz step on the
Krylov basis K = [G_0 .. G_q] uses the products already computed (M = K^T P), so q + 1 Gram passes give
a (q + 1) * l dimensional search space. Compared with subspace iteration (torch.svd_lowrank), keeping
every iterate gives the same accuracy with a smaller block: fewer flops per pass for the same k.
When the Krylov space is at least as large as the data's rank the result is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from w2w.errors import W2WError

STD_FLOOR = 1e-8  # columns whose std is below this are constant: they carry no information


class SubspaceError(W2WError, ValueError):
    pass


class BlockSource(Protocol):
    """Row blocks of an N x D float32 matrix, addressed by picklable specs (so Dask can ship them).

    A spec is a tuple whose last two entries are the block's global row range (lo, hi). A source may also
    have `load_into(spec, out) -> out`, filling a (b, D) float32 array it is given: a pass in this process
    then reads into two reused buffers instead of a fresh array per block.
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


# A pass maps fn(*shared, spec, block) over every block and yields the results in block order.
# `shared` holds the large read-only inputs (mean, std, a D x l basis): a distributed mapper sends them
# to each worker once instead of once per block.
MapBlocks = Callable[[Callable[..., Any], BlockSource, list[Any], tuple], Iterable[Any]]


def map_in_process(fn: Callable[..., Any], source: BlockSource, specs: list[Any], shared: tuple = ()) -> Iterable[Any]:
    """Run a pass here, reading block i+1 on a thread while block i is computed.

    With `source.load_into`, blocks go into two buffers per block size in turn (block i+2 reuses block i's
    once fn is done with it; fn may change its block in place): a fresh 150 MB array per block cost ~70 ms
    of page faults here, 4x the read itself, on a core the products need.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not specs:
        return
    load = source.load
    if hasattr(source, "load_into"):
        buffers: dict[int, list[np.ndarray]] = {}

        def load(spec: Any) -> np.ndarray:
            b = spec[-1] - spec[-2]
            if b not in buffers:
                buffers[b] = [np.empty((b, source.dim), dtype=np.float32) for _ in range(2)]
            pair = buffers[b]
            pair.reverse()  # the other one than last time
            return source.load_into(spec, pair[0])

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, specs[0])
        for i, spec in enumerate(specs):
            block = nxt.result()
            if i + 1 < len(specs):
                nxt = pool.submit(load, specs[i + 1])
            yield fn(*shared, spec, block)


# --- the per-block work (module-level functions, so they pickle for Dask) ---------------------------


def sketch_rows(seed: int, spec: Any, l: int) -> np.ndarray:
    """The rows lo..hi of the N x l Gaussian test matrix, generated from (seed, lo) alone."""
    lo, hi = spec[-2], spec[-1]
    return np.random.default_rng((seed, lo)).standard_normal((hi - lo, l)).astype(np.float32)


def block_stats(seed: int, l: int, spec: Any, W: np.ndarray):
    """(count, mean, M2, (W_b^T Omega_b)^T, colsum of Omega_b) of one block: the stats pass also sketches."""
    b = W.shape[0]
    mean = W.sum(axis=0, dtype=np.float64) / b  # float32 data, float64 sums: no (b, D) float64 copy
    omega = sketch_rows(seed, spec, l)  # (b, l)
    sketch_t = np.ascontiguousarray(omega.T) @ W  # (l, D): see block_gram; before W is overwritten
    dev = W if _scratch(W) else np.empty_like(W)
    np.subtract(W, mean.astype(np.float32), out=dev)  # (b, D)
    dev *= dev
    m2 = np.add.reduce(dev, axis=0, dtype=np.float64)
    return b, mean, m2, sketch_t, omega.sum(axis=0)


def merge_stats(parts: Iterable[tuple]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise update: exact and stable whatever the block sizes. Sketches add up."""
    n, mean, m2, sk, osum = 0, None, None, None, None
    for nb, mb, m2b, skb, ob in parts:
        if mean is None:
            n, mean, m2, sk, osum = nb, mb.copy(), m2b.copy(), skb.copy(), ob.copy()
            continue
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


def block_gram(mean: np.ndarray, std: np.ndarray, G: np.ndarray, spec: Any, W: np.ndarray) -> np.ndarray:
    Z = _standardize_block(W, mean, std)  # (b, D)
    Y = Z @ G  # (b, l)
    # (Z^T Y)^T as Y^T Z: OpenBLAS ran this layout ~1.2x faster than Z.T @ Y at b = 384, D = 99,648, l = 216
    return np.ascontiguousarray(Y.T) @ Z  # (l, D)


# --- the subspace -----------------------------------------------------------------------------------


@dataclass
class FitConfig:
    components: int = 1000
    block: int | None = None  # Krylov block size l; default ceil(k / 5) + oversample
    depth: int = 7  # Krylov blocks = Gram passes (bench/bench_fit.py measures the trade-off)
    oversample: int = 16
    seed: int = 0


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
        atomic_write_safetensors(folder / "subspace.safetensors", arrays)  # no in-memory copy of the components
        atomic_write_bytes(folder / "meta.json", (json.dumps(info, indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> Subspace:
        from safetensors.numpy import load_file

        folder = Path(folder)
        a = load_file(str(folder / "subspace.safetensors"))
        info = json.loads((folder / "meta.json").read_text())
        return cls(
            a["mean"],
            a["std"],
            a["components"],
            a["singular_values"],
            info["total_variance"],
            info["n_models"],
            a["model_ids"].tolist(),
            info.get("config", {}),
        )


def _orth(A: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    """An orthonormal basis of A's columns (D, l) -> (D, l'), dropping directions A does not really span.

    Through the l x l Gram matrix, twice ("twice is enough"): LAPACK's QR of a tall float32 matrix is
    ~50x slower here than the Gram product, and this also handles rank deficiency.
    """
    Q = A
    for _ in range(2):
        G = Q.T.astype(np.float64) @ Q.astype(np.float64) if Q.shape[1] <= 64 else (Q.T @ Q).astype(np.float64)
        evals, evecs = np.linalg.eigh(G)
        keep = evals > (rtol**2) * max(evals.max(initial=0.0), 1e-300)
        Q = Q @ (evecs[:, keep] / np.sqrt(evals[keep])).astype(np.float32)
    return Q


def fit(
    source: BlockSource,
    config: FitConfig | None = None,
    model_ids: list[int] | None = None,
    map_blocks: MapBlocks | None = None,
    progress: Callable[[str], None] | None = None,
) -> Subspace:
    """Fit the w2w subspace of the rows of `source` with 1 stats pass and `depth` Gram passes."""
    cfg = config or FitConfig()
    map_blocks = map_blocks or map_in_process
    n, D = source.n, source.dim
    if n < 3:
        raise SubspaceError(f"a subspace needs at least 3 models, got {n}")
    k = min(cfg.components, n - 1, D)
    specs = source.specs()
    say = progress or (lambda _: None)

    depth = max(1, cfg.depth)
    if n <= k + 32 or n <= depth * (cfg.block or -(-k // 5) + cfg.oversample):
        # small data: one block as large as the data's rank spans the whole row space, so the fit is exact
        # (and a Krylov space larger than the data would only add rounding noise)
        depth, l = 1, n
    else:
        # Seven blocks of k/5: a Krylov space of ~1.4 k dimensions for 30 l = ~6 k flops per row and column,
        # against 12 q (q ~ k) for torch.svd_lowrank(niter=2), at better accuracy. Measured at N = 8,192,
        # k = 1,000 (bench/bench_fit.py): 5 blocks of k/3 took 57.6 s, 6 of k/4 54.3 s, 7 of k/5 50.1 s,
        # 8 of k/6 52.9 s, all within ~1e-8 of the exact singular values.
        l = cfg.block or -(-k // 5) + cfg.oversample
    l = max(1, min(l, D, n))

    say("pass 1: column mean and std, and a sketch of the row space")
    n_seen, mean64, m2, sketch, omega_sum = merge_stats(map_blocks(block_stats, source, specs, (cfg.seed, l)))
    assert n_seen == n, f"blocks held {n_seen} rows, expected {n}"
    std64 = np.sqrt(m2 / max(n - 1, 1))
    std64[std64 < STD_FLOOR] = 1.0  # constant columns: centered they are 0, scaled by 1 they stay 0
    mean, std = mean64.astype(np.float32), std64.astype(np.float32)
    total_variance = float((m2 / std64**2).sum() / max(n - 1, 1))
    # Z^T Omega = S^-1 (W^T Omega - mean 1^T Omega): a start block inside Z's row space, for free
    start = (sketch.T - np.outer(mean64, omega_sum)) / std64[:, None]
    G = _orth(start.astype(np.float32))  # (D, l)
    # K holds the Krylov blocks side by side, preallocated: no copies of the D x m basis. Only the upper
    # block triangle of M = K^T Z^T Z K is computed (M is symmetric), so each product P_i is dropped as soon
    # as the next block is made from it: memory is K plus one D x l product, whatever the depth.
    K = np.empty((D, depth * l), dtype=np.float32)
    M = np.zeros((depth * l, depth * l), dtype=np.float64)
    used = 0
    for i in range(depth):
        say(f"pass {i + 2}: Gram products for Krylov block {i + 1}/{depth} (l = {G.shape[1]})")
        P = np.ascontiguousarray(sum_blocks(map_blocks(block_gram, source, specs, (mean, std, G))).T)  # Z^T Z G
        b = G.shape[1]
        K[:, used : used + b] = G
        used += b
        KtP = _tdot(K[:, :used], P)  # (used, b) = K^T Z^T Z G_i
        M[:used, used - b : used] = KtP
        if i + 1 == depth:
            break
        Ku = K[:, :used]
        R = P - Ku @ KtP.astype(np.float32)  # the first Gram-Schmidt pass reuses K^T P from M
        R -= Ku @ (Ku.T @ R)  # twice is enough (Kahan/Parlett) to keep K orthonormal in float32
        scale = np.linalg.norm(P, axis=0).max(initial=0.0)
        del P
        R[:, np.linalg.norm(R, axis=0) <= 1e-5 * max(scale, 1e-30)] = 0.0  # what K already spans
        G = np.ascontiguousarray(_orth(R))
        del R
        if G.shape[1] == 0:
            break  # the Krylov space is invariant: it already holds the whole row space
    # The rest holds K (D x used) and V (D x k) plus used x used float64 matrices: at k = 10,000 (used =
    # 14,112) that is 5.6 + 4 + 1.6 GB each, so every temporary is dropped as soon as it is used and V is
    # made in row blocks (a product with a column slice K[:, :used] of K would first copy it whole).
    M = M[:used, :used]
    M = np.triu(M) + np.triu(M, 1).T  # the lower triangle by symmetry
    # Rayleigh-Ritz on span(K) without trusting K to be orthonormal to the last bit (blocks made from
    # tiny residuals lose orthogonality in float32): whiten with K^T K, dropping dependent directions.
    S = _tdot(K[:, :used], K[:, :used])  # (used, used), ~identity
    S += S.T
    S /= 2
    s_vals, s_vecs = np.linalg.eigh(S)
    del S
    keep = s_vals > 1e-6 * s_vals.max()
    Wh = s_vecs[:, keep] / np.sqrt(s_vals[keep])  # (used, r): K @ Wh is orthonormal
    del s_vecs
    evals, evecs = np.linalg.eigh(Wh.T @ (M @ Wh))
    del M
    order = np.argsort(evals)[::-1][:k]
    Q = (Wh @ evecs[:, order]).astype(np.float32)  # (used, k)
    del Wh, evecs
    V = np.empty((D, len(order)), dtype=np.float32)
    for lo in range(0, D, 4096):
        np.matmul(K[lo : lo + 4096, :used], Q, out=V[lo : lo + 4096])
    del K, Q
    V = _orth_stable_signs(V)
    s = np.sqrt(np.maximum(evals[order], 0.0))
    config = asdict(cfg) | {"block": l, "k": int(V.shape[1])}
    return Subspace(mean, std, V, s, total_variance, n, list(model_ids or []), config)


def _tdot(A: np.ndarray, B: np.ndarray, rows: int = 16384) -> np.ndarray:
    """A^T B in float64 accumulated over row chunks of float32 products (D is long: float32 sums drift)."""
    out = np.zeros((A.shape[1], B.shape[1]), dtype=np.float64)
    for lo in range(0, A.shape[0], rows):
        out += A[lo : lo + rows].T @ B[lo : lo + rows]
    return out


def sum_blocks(parts: Iterable[np.ndarray]) -> np.ndarray:
    total = None
    for p in parts:
        total = p.astype(np.float32, copy=True) if total is None else total.__iadd__(p)
    return total


def _orth_stable_signs(V: np.ndarray) -> np.ndarray:
    """Make each component's entries sum to a positive number, so refits of the same data agree in sign.

    (Not "largest entry positive": |V| of a D x k matrix is a 400 MB temporary and an argmax that cost
    2 s at k = 1,000.)
    """
    signs = np.sign(V.sum(axis=0, dtype=np.float64)).astype(V.dtype)
    signs[signs == 0] = 1
    V *= signs
    return V
