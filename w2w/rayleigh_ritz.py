"""The Rayleigh-Ritz step of the fit, in place: the top-k Ritz pairs of Z^T Z on span(K).

Given M = K^T Z^T Z K and S = K^T K (m x m float64, upper block triangles filled), find (theta, Q) with
K Q orthonormal and Q^T M Q = diag(theta). K is not trusted to be orthonormal to the last bit (blocks made
from small residuals lose orthogonality in float32), so S is factored: S = R^T R (Cholesky), then
T = R^-T M R^-1 is a plain symmetric eigenproblem and Q = R^-1 X for its top eigenvectors X.

Memory: T is made in M's buffer, S is freed once factored, and only the k wanted eigenvectors are
computed (LAPACK's dsyevr with an index range, O(m) workspace): 24 m^2 bytes while S is factored, then
16 m^2 + 8 m k, where numpy's eigh of the whole problem would need ~4 m^2 float64 for itself (6.4 GB at
m = 14,112).
"""

from __future__ import annotations

import numpy as np

# S's smallest eigenvalue below this times its largest: K has a direction it does not really span (the
# Cholesky factor would amplify its rounding into spurious Ritz values): whiten by eigenvectors instead.
S_RTOL = 1e-6


def symmetrize_upper(A: np.ndarray, step: int = 2048) -> None:
    """Copy A's upper triangle onto its lower one, in place, a block row at a time (no m x m temporary)."""
    m = A.shape[0]
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        A[hi:, lo:hi] = A[lo:hi, hi:].T
        block = A[lo:hi, lo:hi]
        block[...] = np.triu(block) + np.triu(block, 1).T


def ritz(parts: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(theta (k,) descending, Q (m, k) float64, method) from parts = [M, S] (m, m) float64, upper block
    triangles filled. The list is emptied and M is overwritten, so S is freed as soon as it is factored."""
    from scipy.linalg import eigh
    from scipy.linalg.blas import dtrsm

    M, S = parts
    parts.clear()
    m = M.shape[0]
    k = min(k, m)
    symmetrize_upper(M)
    symmetrize_upper(S)
    # Fortran-ordered views of the symmetric matrices (equal to them): LAPACK works on them without a copy
    R, info = _cholesky(S.T)
    if R is None:
        return (*_ritz_whitened(M, S, k), f"whitened ({info})")
    del S
    T = dtrsm(1.0, R, M.T, side=0, lower=0, trans_a=1, overwrite_b=1)  # R^-T M, in M's buffer
    T = dtrsm(1.0, R, T, side=1, lower=0, trans_a=0, overwrite_b=1)  # (R^-T M) R^-1
    assert np.shares_memory(T, M), "the triangular solves copied M"
    del M
    theta, X = eigh(T, subset_by_index=[m - k, m - 1], driver="evr", overwrite_a=True, check_finite=False)
    del T
    X = dtrsm(1.0, R, X, side=0, lower=0, trans_a=0, overwrite_b=1)  # Q = R^-1 X, (m, k)
    order = np.argsort(theta)[::-1]
    return theta[order], X[:, order], "cholesky"


def _cholesky(Sf: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(R, "") with S = R^T R, or (None, why) when S is not safely positive definite."""
    from scipy.linalg import LinAlgError, cholesky

    try:
        R = cholesky(Sf, lower=False, overwrite_a=False, check_finite=False)
    except LinAlgError as e:
        return None, str(e)
    d = np.diag(R) ** 2  # a lower bound of sorts on S's spectrum: d.min() >= lambda_min(S)
    if d.min() <= S_RTOL * d.max():
        return None, f"K^T K's pivots span {d.min():.1e}..{d.max():.1e}"
    return R, ""


def _ritz_whitened(M: np.ndarray, S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The fallback when K is nearly rank deficient: whiten with S's eigenvectors, dropping the directions
    K does not really span (~5 m^2 float64: more memory than the Cholesky path, which is why it is not the
    first choice)."""
    from scipy.linalg import eigh

    s_vals, s_vecs = eigh(S, driver="evr", overwrite_a=True, check_finite=False)
    keep = s_vals > S_RTOL * s_vals.max()
    Wh = s_vecs[:, keep] / np.sqrt(s_vals[keep])  # (m, r): K @ Wh is orthonormal
    del s_vecs
    T = Wh.T @ (M @ Wh)
    del M
    r = T.shape[0]
    theta, X = eigh(T, subset_by_index=[max(r - k, 0), r - 1], driver="evr", overwrite_a=True, check_finite=False)
    order = np.argsort(theta)[::-1]
    return theta[order], Wh @ X[:, order]
