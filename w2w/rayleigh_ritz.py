"""The Rayleigh-Ritz step of the fit, in place: the top-k Ritz pairs of Z^T Z on span(K).

Given M = K^T Z^T Z K (m x m float64, upper block triangle filled) and the diagonal blocks S_i = G_i^T G_i
of K^T K, find (theta, Q) with K Q orthonormal and Q^T M Q = diag(theta). K's blocks are orthogonal to
each other to float32 rounding (the fit orthogonalizes each new block twice against K), so K^T K is taken
as block diagonal; within a block the columns are not trusted to be orthonormal to the last bit, so each
block is whitened: W_i = V_i diag(lambda_i)^-1/2 from S_i's eigenpairs, dropping the directions a block
does not really span. Then T = W^T M W is a plain symmetric eigenproblem and Q = W X for its top
eigenvectors X.

Memory: T is made in M's buffer (a block at a time) when no direction is dropped. The eigenproblem has three
LAPACK routes (fit_plan picks the fastest whose memory fits the budget):
  evd        dsyevd, every pair by divide and conquer in T's buffer: 2 m^2 doubles of workspace, then a new Q
  evr        dsyevr, every pair by MRRR (dstemr) into a new m x m array; Q is made in its last k columns
  evr-range  dsyevr for the top k pairs only: LAPACK then takes bisection and inverse iteration (dstebz,
             dstein), which reorthogonalizes within clusters of close eigenvalues, and a Krylov space's tail
             is one: 2.1x slower than all pairs by MRRR at m = 8,000, top 4,800 (bench/bench_ritz.py);
             the least memory (8 m k)
Q = W X is made in X's buffer a block row at a time (evr, evr-range) and handed back in descending order as
a reversed view: beside M (which the caller may hold) ritz holds evd 16 m^2 + 8 m k, evr 8 m^2 + 8 l k,
evr-range 8 m k + 8 l k, and the whiteners' 8 l^2 depth. (A new Q and its reordered copy had made it 8 m^2 +
24 m k: 7.7 GB at the paper's k = 10,000, m = 16,750, over the plan's 5.4 GB.) When a block drops directions
T is a new, smaller array (M and T alive at once: that path is for degenerate data).
"""

from __future__ import annotations

import numpy as np

# An eigenvalue of S_i below this times its largest: the block has a direction it does not really span
# (whitening would amplify its rounding into spurious Ritz values): it is dropped.
S_RTOL = 1e-6
# The eigensolver routes, fastest first where their memory fits (fit_plan.choose takes the first that does)
DRIVERS = ("evd", "evr", "evr-range")


def symmetrize_upper(A: np.ndarray, step: int = 1024) -> None:
    """Copy A's upper triangle onto its lower one, in place, a block row at a time (no temporary)."""
    m = A.shape[0]
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        A[hi:, lo:hi] = A[lo:hi, hi:].T
        for j in range(lo, hi - 1):  # the diagonal block, a column at a time
            A[j + 1 : hi, j] = A[j, j + 1 : hi]


def whiteners(blocks: list[np.ndarray]) -> list[np.ndarray]:
    """W_i (l_i, r_i) with W_i^T S_i W_i = I for each diagonal block S_i of K^T K; `blocks` is emptied (each
    S_i is dropped once its W_i is made)."""
    out = []
    while blocks:
        S = blocks.pop(0)
        vals, vecs = np.linalg.eigh(S)
        del S
        keep = vals > S_RTOL * max(vals.max(initial=0.0), 1e-300)
        out.append(vecs[:, keep] / np.sqrt(vals[keep]))
    return out


def ritz(M: np.ndarray, blocks: list[np.ndarray], k: int, driver: str = "evr") -> tuple[np.ndarray, np.ndarray, str]:
    """(theta (k,) descending, Q (m, k) float64, method) from M (m, m) float64 with its upper block triangle
    filled, overwritten, and the diagonal blocks S_i of K^T K (their sizes partition m; the list is emptied).
    Q may be a view (of the eigenvectors' buffer, in reverse column order).

    driver: "evd", "evr" or "evr-range" (the module docstring: LAPACK's routes, their time and memory)."""
    from scipy.linalg import eigh

    if driver not in DRIVERS:
        raise ValueError(f"unknown eigensolver driver {driver!r}; one of {', '.join(DRIVERS)}")
    symmetrize_upper(M)
    Ws = whiteners(blocks)
    edges = np.cumsum([0] + [W.shape[0] for W in Ws])
    kept = np.cumsum([0] + [W.shape[1] for W in Ws])
    assert edges[-1] == M.shape[0], f"blocks of {edges[-1]} columns for M of {M.shape[0]}"
    r = int(kept[-1])
    T = M if r == M.shape[0] else np.empty((r, r))
    for i, Wi in enumerate(Ws):
        for j, Wj in enumerate(Ws):
            Mij = M[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            T[kept[i] : kept[i + 1], kept[j] : kept[j + 1]] = Wi.T @ Mij @ Wj
    del M
    k = min(k, r)
    # T.T: the Fortran-ordered view of the symmetric T (equal to it): LAPACK works on it without a copy
    if driver == "evr-range":
        theta, X = eigh(T.T, subset_by_index=[r - k, r - 1], driver="evr", overwrite_a=True, check_finite=False)
    else:
        theta, X = eigh(T.T, driver=driver, overwrite_a=True, check_finite=False)
        theta, X = theta[r - k :], X[:, r - k :]  # ascending: the top k are the last
    del T
    # with every W_i square, Q's block row i is W_i times X's: made in X's buffer (for evr, the last k columns of
    # its m x m eigenvectors, Fortran-ordered: contiguous); with evd a new Q, so that evd's m x m array (in M's
    # buffer, which the caller may hold) is not kept alive by it; and a new Q where X has fewer rows than Q
    in_place = r == edges[-1] and driver != "evd"
    Q = X if in_place else np.empty((int(edges[-1]), k))
    for i, Wi in enumerate(Ws):
        Q[edges[i] : edges[i + 1]] = Wi @ X[kept[i] : kept[i + 1]]
    del X
    how = "block-diagonal" if r == edges[-1] else f"block-diagonal, {r} of {edges[-1]}"
    # LAPACK returns the eigenvalues ascending: descending is a reversed view, not a reordered copy
    return theta[::-1], Q[:, ::-1], how if driver == "evr" else f"{how}, {driver}"
