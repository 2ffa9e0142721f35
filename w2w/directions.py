"""Attribute directions in coefficient space: the w2w editing step.

A direction is a unit vector d (k,) in the coefficient space of a subspace. The score s(c) = c @ d measures
the attribute; an edit moves c -> c + strength * score_std * d, i.e. by `strength` standard deviations of
the score over the fitting models. (The paper's raw pinv(C) y has no such unit: its notebooks edit with
strengths like 1e6.)

Methods (METHODS, a name -> function registry; each gets the column-centered coefficients Cc (N, k) and
the labels y (N,), binary labels already mapped to 0/1, and returns an unnormalized vector (k,)):
  lstsq      the paper's least squares, pinv(Cc) (y - mean y). The paper writes pinv(C) y on raw labels;
             over the subspace's own models the coefficients have zero mean, so C^T 1 = 0 and both agree.
  ridge      (Cc^T Cc + lam I)^-1 Cc^T (y - mean y), lam by generalized cross-validation over a fixed grid.
  logistic   L2-regularized logistic regression (binary labels only), Newton / IRLS.
  mean_diff  Cc^T (y - mean y): the class-mean difference for binary labels (up to a positive factor), the
             coefficient-label covariance for numeric ones.

Regression weights (lstsq, ridge, logistic) are the best *predictors* of the label; mean_diff is the
covariance "pattern", Cov(c) @ beta. Among edits that raise the predicted label by a fixed amount, the
pattern is the one with the smallest Mahalanobis length under the models' own distribution, i.e. the edit
that changes the least else: bench/bench_directions.py measures which recovers a planted attribute best,
and DEFAULT_METHOD is its winner.

Labels: NaN means unknown, and those models are left out of the fit. Exactly two distinct values make an
attribute binary (the larger value is class 1); more make it numeric.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from w2w.errors import DirectionError

# Measured by bench/bench_directions.py (planted anisotropic data, latent-space cosine with the planted
# attribute, averaged over N, k, binary and numeric attributes); see the README's table.
DEFAULT_METHOD = "mean_diff"
MIN_PER_CLASS = 3  # fewer models on one side of a binary attribute give a direction made of noise
RIDGE_GRID = np.logspace(-8, 2, 41)  # GCV candidates, as multiples of the largest squared singular value


@dataclass(eq=False)
class Direction:
    """A fitted attribute direction: unit vector (k,) plus the score statistics that give `step` its unit."""

    attribute: str
    method: str
    vector: np.ndarray  # (k,) unit norm, in coefficient space
    score_mean: float  # mean of s(c) = c @ vector over the fitting models
    score_std: float  # population std of that score over the fitting models (> 0)
    n_models: int
    debiased_against: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.vector = np.asarray(self.vector, dtype=np.float64).reshape(-1)
        self.debiased_against = tuple(self.debiased_against)

    @property
    def k(self) -> int:
        return self.vector.shape[0]

    def scores(self, C: np.ndarray) -> np.ndarray:
        """Attribute scores of coefficients C (N, k) -> (N,), or of one c (k,) -> ()."""
        C = np.asarray(C, dtype=np.float64)
        if C.shape[-1] != self.k:
            raise DirectionError(f"coefficients have {C.shape[-1]} components but direction {self._name} has {self.k}")
        return C @ self.vector

    def step(self, strength: float) -> np.ndarray:
        """Coefficient displacement (k,) that moves the score by `strength` score standard deviations."""
        return float(strength) * self.score_std * self.vector

    @property
    def components(self) -> int:
        """How many leading coefficients the direction uses (it is zero beyond them: fit_direction's K)."""
        nz = np.flatnonzero(self.vector)
        return int(nz[-1]) + 1 if nz.size else 0

    @property
    def _name(self) -> str:
        return repr(self.attribute) if self.attribute else "(unnamed)"


# --- methods -----------------------------------------------------------------------------------------


def _svd(Cc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of Cc (N, k) cut to its numerical rank r: U (N, r), s (r,), Vt (r, k)."""
    U, s, Vt = np.linalg.svd(Cc, full_matrices=False)
    r = int(np.sum(s > s[0] * max(Cc.shape) * np.finfo(np.float64).eps)) if s.size and s[0] > 0 else 0
    return U[:, :r], s[:r], Vt[:r]


def _gcv_lambda(U: np.ndarray, s: np.ndarray, yc: np.ndarray) -> float:
    """Ridge penalty minimizing generalized cross-validation, N * RSS / (N - df)^2, over RIDGE_GRID * s_max^2.

    df counts the intercept (labels were centered). GCV is leave-one-out CV's rotation-invariant cousin, in
    closed form from one SVD, and deterministic (no fold split).
    """
    n = yc.shape[0]
    uty = U.T @ yc  # (r,)
    rss0 = float(yc @ yc - uty @ uty)  # part of y outside the column space: never fitted
    lams = RIDGE_GRID * s[0] ** 2
    s2 = s**2
    shrink = lams[:, None] / (s2[None, :] + lams[:, None])  # (G, r): 1 - hat-matrix eigenvalues
    rss = rss0 + (shrink**2 * uty**2).sum(axis=1)
    df = (1.0 - shrink).sum(axis=1) + 1.0
    with np.errstate(divide="ignore"):
        gcv = np.where(df < n, n * rss / np.maximum(n - df, 0.0) ** 2, np.inf)
    return float(lams[int(np.argmin(gcv))])


def lstsq(Cc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The paper's least squares: minimum-norm pinv(Cc) (y - mean y)."""
    return np.linalg.lstsq(Cc, y - y.mean(), rcond=None)[0]


def ridge(Cc: np.ndarray, y: np.ndarray, lam: float | None = None) -> np.ndarray:
    """(Cc^T Cc + lam I)^-1 Cc^T (y - mean y); lam=None picks it by GCV (`_gcv_lambda`)."""
    yc = y - y.mean()
    U, s, Vt = _svd(Cc)
    if s.size == 0:
        return np.zeros(Cc.shape[1])
    if lam is None:
        lam = _gcv_lambda(U, s, yc)
    elif not lam > 0:
        raise DirectionError(f"ridge needs lam > 0, got {lam}")
    return Vt.T @ (s / (s**2 + lam) * (U.T @ yc))


def logistic(Cc: np.ndarray, y: np.ndarray, lam: float | None = None, max_iter: int = 100) -> np.ndarray:
    """L2-regularized logistic regression (with intercept) by Newton's method with backtracking.

    Minimizes sum_i logloss(y_i, b0 + c_i . beta) + lam/2 ||beta||^2. The optimum lies in Cc's row space,
    so Newton runs on the r = rank(Cc) coordinates F = U S (cost N r^2 per step, not N k^2).
    lam=None takes the GCV ridge penalty / 4: at beta = 0 the logistic Hessian is Cc^T Cc / 4, so the first
    Newton step is then exactly the GCV ridge solution, which the next steps bend toward the logistic loss.
    """
    if not np.array_equal(np.unique(y), [0.0, 1.0]):
        raise DirectionError("logistic needs a binary attribute (two label values); use ridge or mean_diff")
    U, s, Vt = _svd(Cc)
    if s.size == 0:
        return np.zeros(Cc.shape[1])
    if lam is None:
        lam = _gcv_lambda(U, s, y - y.mean()) / 4.0
    elif not lam > 0:
        raise DirectionError(f"logistic needs lam > 0 (separable classes have no finite optimum), got {lam}")
    X = np.hstack([np.ones((y.shape[0], 1)), U * s])  # (N, 1 + r): intercept, then row-space coordinates
    pen = np.full(X.shape[1], lam)
    pen[0] = 0.0  # the intercept is not shrunk

    def loss(t: np.ndarray) -> float:
        eta = X @ t
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * np.sum(pen * t * t))

    theta = np.zeros(X.shape[1])
    f = loss(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (X @ theta)))  # sigmoid without overflow
        g = X.T @ (p - y) + pen * theta
        H = (X * (p * (1.0 - p))[:, None]).T @ X
        H[np.diag_indices_from(H)] += pen + 1e-12  # jitter: the intercept's curvature -> 0 if p saturates
        delta = np.linalg.solve(H, g)
        decrement = float(g @ delta)
        if decrement < 1e-12 * max(1.0, abs(f)):
            break
        t = 1.0
        while t > 1e-10:  # backtracking (Armijo): a full Newton step can overshoot far from the optimum
            f_new = loss(theta - t * delta)
            if f_new <= f - 0.25 * t * decrement:
                break
            t *= 0.5
        else:
            break  # no descent along the Newton step: at the optimum up to rounding
        theta, f = theta - t * delta, f_new
    return Vt.T @ theta[1:]


def mean_diff(Cc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cc^T (y - mean y): n0 n1 / N times the class-mean difference (binary), N times Cov(c, y) (numeric)."""
    return Cc.T @ (y - y.mean())


METHODS: dict[str, Callable[..., np.ndarray]] = {
    "lstsq": lstsq,
    "ridge": ridge,
    "logistic": logistic,
    "mean_diff": mean_diff,
}


# --- fitting -----------------------------------------------------------------------------------------


def _method(name: str, kw: dict) -> Callable[..., np.ndarray]:
    if name not in METHODS:
        raise DirectionError(f"unknown direction method {name!r}; known: {', '.join(sorted(METHODS))}")
    fn = METHODS[name]
    options = list(inspect.signature(fn).parameters)[2:]  # after (Cc, y)
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise DirectionError(
            f"method {name!r} takes no option {', '.join(unknown)}; its options: {', '.join(options) or 'none'}"
        )
    return fn


def _prepare(C: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate; drop unlabelled (NaN) rows; map binary labels to 0/1. -> C (n, k) float64, y (n,) float64."""
    C = np.asarray(C, dtype=np.float64)
    try:
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DirectionError(f"attribute {name}: labels must be numbers (0/1 or values), not {e}") from None
    if C.ndim != 2 or C.shape[1] == 0:
        raise DirectionError(f"coefficients must be an (N, k) array with k >= 1, got shape {C.shape}")
    if y.ndim != 1 or y.shape[0] != C.shape[0]:
        raise DirectionError(f"attribute {name}: {C.shape[0]} coefficient rows but labels of shape {y.shape}")
    if not np.all(np.isfinite(C)):
        raise DirectionError("coefficients contain NaN or Inf")
    if np.any(np.isinf(y)):
        raise DirectionError(f"attribute {name}: labels contain Inf (use NaN for unknown)")
    known = ~np.isnan(y)
    C, y = C[known], y[known]
    values, counts = np.unique(y, return_counts=True)
    if values.size == 0:
        raise DirectionError(f"attribute {name}: no model has a label (all NaN)")
    if values.size == 1:
        raise DirectionError(
            f"attribute {name}: every labelled model ({y.size}) has the same value {values[0]:g}; "
            "a direction needs models on both sides"
        )
    if values.size == 2:
        if counts.min() < MIN_PER_CLASS:
            rare = values[int(np.argmin(counts))]
            raise DirectionError(
                f"attribute {name}: only {counts.min()} labelled model(s) have value {rare:g}; "
                f"a binary attribute needs at least {MIN_PER_CLASS} per class"
            )
        y = (y == values[1]).astype(np.float64)
    return C, y


def fit_direction(
    C: np.ndarray,
    y: np.ndarray,
    method: str = DEFAULT_METHOD,
    attribute: str = "",
    components: int | None = None,
    **kw: object,
) -> Direction:
    """Fit the direction of attribute labels y (N,) in coefficients C (N, k); NaN labels are left out.

    kw are the method's options (ridge/logistic: lam). The vector is unit norm and oriented so the score
    grows with the label. `components` K fits it over the first K coefficients only (zero beyond), as the
    paper edits with the first 1,000 of 10,000: a class-mean difference over N models carries noise of
    covariance ~ Cov(c) / N in every component, while an attribute's signal sits in the leading ones, so
    the trailing components add mostly noise (bench/bench_fidelity.py measures it in the toy world).
    """
    fn = _method(method, kw)
    name = repr(attribute) if attribute else "(unnamed)"
    C, y = _prepare(C, y, name)
    k = C.shape[1]
    if components is not None and components < 1:
        raise DirectionError(f"attribute {name}: components must be >= 1, got {components}")
    K = k if components is None else min(int(components), k)
    Cc = C - C.mean(axis=0)  # (n, k)
    v = np.zeros(k)
    v[:K] = np.asarray(fn(Cc[:, :K], y, **kw), dtype=np.float64)  # (K,) -> (k,), zero beyond K
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError(f"attribute {name}: method {method!r} found no direction (labels unrelated to C?)")
    v = v / norm
    if (Cc @ v) @ (y - y.mean()) < 0:  # orient: a positive step raises the attribute
        v = -v
    return _with_stats(Direction(attribute, method, v, 0.0, 1.0, 0), C, name)


def _with_stats(d: Direction, C: np.ndarray, name: str) -> Direction:
    s = C @ d.vector  # (n,)
    std = float(s.std())
    if not std > 1e-12 * max(1.0, float(np.abs(s).max())):
        raise DirectionError(f"attribute {name}: the score does not vary over the models (std {std:g})")
    d.score_mean, d.score_std, d.n_models = float(s.mean()), std, int(C.shape[0])
    return d


def debias(d: Direction, others: Sequence[Direction], C: np.ndarray) -> Direction:
    """d with its components along `others` removed, its score statistics recomputed over C (N, k).

    The others are orthonormalized first (SVD), so the result is orthogonal to each of them, unlike the
    paper's sequential d -= (d.e / |e|^2) e, which is only orthogonal to the last e when the e overlap.
    """
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2 or C.shape[1] != d.k:
        raise DirectionError(f"coefficients of shape {C.shape} do not match direction {d._name} (k = {d.k})")
    for o in others:
        if o.k != d.k:
            raise DirectionError(f"direction {o._name} has k = {o.k}, direction {d._name} has k = {d.k}")
    v = d.vector.copy()
    if others:
        E = np.stack([o.vector for o in others], axis=1)  # (k, m)
        Q, s, _ = np.linalg.svd(E, full_matrices=False)
        Q = Q[:, s > s[0] * 1e-10]  # orthonormal basis of span(others), repeated ones dropped
        for _ in range(2):  # project twice: one pass leaves rounding error ~ eps * |d| / |result|
            v -= Q @ (Q.T @ v)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise DirectionError(
            f"direction {d._name} lies within the span of {', '.join(o._name for o in others)}: nothing is left"
        )
    against = d.debiased_against + tuple(o.attribute for o in others if o.attribute not in d.debiased_against)
    out = Direction(d.attribute, d.method, v / norm, 0.0, 1.0, 0, against)
    return _with_stats(out, C, d._name)
