"""Attribute directions: recovery of planted attributes, step units, debiasing, errors."""

from __future__ import annotations

import numpy as np
import pytest

from w2w.directions import DEFAULT_METHOD, METHODS, MIN_PER_CLASS, Direction, debias, fit_direction
from w2w.errors import DirectionError, W2WError


def _planted(n: int, k: int, seed: int = 0, d: int = 400, m: int = 4, decay: float = 0.1):
    """A small copy of bench/bench_directions.py's world: w = mean + diag(s) U diag(g) z + noise, anisotropic.

    g decays geometrically from 1 to `decay` (1.0: the bench's "equal" family).

    -> C (n, k) coefficients of the paper's z-scored PCA, labels, a (m,), b (m,), and `latent`, which maps a
    coefficient direction (k,) to the latent change (m,) of that edit.
    """
    rng = np.random.default_rng(seed)
    s = np.exp(rng.uniform(np.log(1e-3), 0.0, d))  # per-parameter scale over three decades
    L = s[:, None] * rng.standard_normal((d, m)) * np.geomspace(1.0, decay, m)  # (d, m) loadings
    noise_sd = 0.05 * np.exp(rng.uniform(np.log(1e-3), 0.0, d))
    z = rng.standard_normal((n, m))
    W = rng.standard_normal(d) * s + z @ L.T + rng.standard_normal((n, d)) * noise_sd  # (n, d)
    a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((2, m)))
    labels = {
        "binary": (z @ a + 0.3 * rng.standard_normal(n) > 0).astype(float),
        "numeric": z @ b + 0.3 * rng.standard_normal(n),
    }
    mean, std = W.mean(0), W.std(0)
    _, _, Vt = np.linalg.svd((W - mean) / std, full_matrices=False)
    V = Vt[:k].T  # (d, k)
    pinv_L = np.linalg.pinv(L)

    def latent(vec: np.ndarray) -> np.ndarray:
        return pinv_L @ ((V @ vec) * std)

    return ((W - mean) / std) @ V, labels, a, b, latent


U64 = 2.0**-53  # float64 unit roundoff. Everything here is float64: np.isclose/np.allclose's defaults (rtol 1e-5,
# atol 1e-8) sit far above the rounding of two float64 solutions of one well-posed problem (~cond * k * u ~ 1e-12)
# and far below any real difference between methods; the cosine thresholds are statistical (fixed seeds).


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


@pytest.fixture(scope="module")
def planted():
    return _planted(n=600, k=40)


# --- recovery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.1, 1.0])
@pytest.mark.parametrize("attr", ["binary", "numeric"])
def test_default_method_recovers_planted_direction_in_latent_space(planted, attr, decay):
    C, labels, a, b, latent = planted if decay == 0.1 else _planted(n=600, k=40, seed=5, decay=decay)
    d = fit_direction(C, labels[attr], attribute=attr)
    assert d.method == DEFAULT_METHOD and d.attribute == attr and d.n_models == len(C)
    assert _cos(latent(d.vector), a if attr == "binary" else b) > 0.9


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_recovers_a_clean_direction_when_n_much_larger_than_k(method):
    rng = np.random.default_rng(1)
    C = rng.standard_normal((4000, 8)) * 3.0 + 1.0  # (N, k) isotropic: every method's target is `true`
    true = rng.standard_normal(8)
    true /= np.linalg.norm(true)
    kinds = {"binary": (C @ true + 0.2 * rng.standard_normal(4000) > 3.0 * true.sum() / 3).astype(float)}
    if method != "logistic":
        kinds["numeric"] = C @ true + 0.2 * rng.standard_normal(4000)
    for y in kinds.values():
        d = fit_direction(C, y, method=method)
        assert np.isclose(np.linalg.norm(d.vector), 1.0)
        assert _cos(d.vector, true) > 0.98  # positive: oriented so the score grows with the label
        assert np.corrcoef(d.scores(C), y)[0, 1] > 0.5


def test_lstsq_is_the_papers_pinv_on_the_subspace_models(planted):
    C, labels, *_ = planted
    C0 = C - C.mean(0)  # a subspace's own models have zero-mean coefficients
    y = labels["numeric"]
    d = fit_direction(C0, y, method="lstsq")
    paper = np.linalg.pinv(C0) @ y
    assert np.allclose(d.vector, paper / np.linalg.norm(paper))


def test_mean_diff_is_the_class_mean_difference(planted):
    C, labels, *_ = planted
    y = labels["binary"]
    diff = C[y == 1].mean(0) - C[y == 0].mean(0)
    assert np.allclose(fit_direction(C, y, method="mean_diff").vector, diff / np.linalg.norm(diff))


def test_two_valued_labels_are_binary_whatever_the_values(planted):
    C, labels, *_ = planted
    y = labels["binary"]
    ref = fit_direction(C, y, method="logistic").vector
    assert np.allclose(fit_direction(C, np.where(y == 1, 5.0, -2.0), method="logistic").vector, ref)
    assert np.allclose(fit_direction(C, y.astype(bool), method="logistic").vector, ref)


def test_options_reach_the_method(planted):
    C, labels, *_ = planted
    y = labels["numeric"]
    huge = fit_direction(C, y, method="ridge", lam=1e12).vector  # ridge -> mean_diff as lam grows
    assert _cos(huge, fit_direction(C, y, method="mean_diff").vector) > 0.999999
    tiny = fit_direction(C, y, method="ridge", lam=1e-9).vector  # ... and -> lstsq as lam shrinks
    assert _cos(tiny, fit_direction(C, y, method="lstsq").vector) > 0.999999


# --- step and scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_moves_the_score_by_exactly_its_std(planted, method):
    C, labels, *_ = planted
    d = fit_direction(C, labels["binary"], method=method)
    s = d.scores(C)
    assert np.isclose(d.score_mean, s.mean()) and np.isclose(d.score_std, s.std()) and d.score_std > 0
    for strength in (1.0, -2.5):
        step = d.step(strength)
        moved = d.scores(C + step)
        # each score c @ v (k terms, |v| = 1) errs by <= (k + 2) u ||c|| in any order (+2: the step's and the
        # sum's rounding), and the difference of two of them cancels nothing of that
        tol = 2 * (C.shape[1] + 2) * U64 * (np.linalg.norm(C, axis=1) + np.linalg.norm(step))
        assert np.all(np.abs(moved - s - strength * d.score_std) <= tol)
    assert d.scores(C[0]).shape == ()


def test_scores_reject_wrong_k(planted):
    C, labels, *_ = planted
    d = fit_direction(C, labels["binary"], attribute="Male")
    with pytest.raises(DirectionError, match="39 components.*'Male' has 40"):
        d.scores(C[:, :39])


# --- debiasing ---------------------------------------------------------------------------------------


def test_debias_is_orthogonal_to_every_other_and_keeps_its_attribute():
    rng = np.random.default_rng(2)
    C = rng.standard_normal((2000, 30)) * np.linspace(3, 0.5, 30)  # (N, k)
    base = rng.standard_normal((3, 30))
    base[1] += 0.8 * base[0]  # correlated attributes: the case debiasing is for
    base[2] += 0.5 * base[0] - 0.5 * base[1]
    ys = {name: C @ w + rng.standard_normal(2000) for name, w in zip(["Male", "Beard", "Bald"], base, strict=True)}
    dirs = {name: fit_direction(C, y, attribute=name) for name, y in ys.items()}
    others = [dirs["Beard"], dirs["Bald"]]
    out = debias(dirs["Male"], others, C)
    assert out.debiased_against == ("Beard", "Bald") and out.attribute == "Male"
    assert np.isclose(np.linalg.norm(out.vector), 1.0)
    for o in others:
        # float64 projection: ~k u cond ~ 1e-13; without it their cosine would remain (correlated on purpose)
        assert abs(out.vector @ o.vector) < 1e-8
    s = out.scores(C)
    assert np.isclose(out.score_std, s.std()) and np.isclose(out.score_mean, s.mean())
    assert np.corrcoef(s, ys["Male"])[0, 1] > 0.3
    assert out.vector @ dirs["Male"].vector > 0  # same orientation as before
    again = debias(out, [dirs["Beard"]], C)  # repeats are not listed twice
    assert again.debiased_against == ("Beard", "Bald")


def test_debias_errors(planted):
    C, labels, *_ = planted
    d = fit_direction(C, labels["binary"], attribute="Male")
    same = fit_direction(C, labels["binary"], attribute="Male2")
    with pytest.raises(DirectionError, match="span"):
        debias(d, [same], C)
    with pytest.raises(DirectionError, match="k = 40"):
        debias(d, [Direction("x", "lstsq", np.ones(5) / np.sqrt(5), 0.0, 1.0, 1)], C)
    with pytest.raises(DirectionError, match="do not match"):
        debias(d, [], C[:, :10])


# --- errors ------------------------------------------------------------------------------------------


def test_nan_labels_are_left_out(planted):
    C, labels, *_ = planted
    y = labels["numeric"].copy()
    y[::7] = np.nan
    keep = ~np.isnan(y)
    d = fit_direction(C, y)
    ref = fit_direction(C[keep], y[keep])
    assert d.n_models == keep.sum() and np.allclose(d.vector, ref.vector) and np.isclose(d.score_std, ref.score_std)
    with pytest.raises(DirectionError, match="all NaN"):
        fit_direction(C, np.full(len(C), np.nan))


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.ones(20), "same value 1"),
        (np.r_[np.ones(18), np.zeros(MIN_PER_CLASS - 1)], f"only {MIN_PER_CLASS - 1} .* at least {MIN_PER_CLASS}"),
        (np.ones(19), "20 coefficient rows but labels of shape"),
        (np.r_[np.zeros(10), np.ones(9), np.inf], "Inf"),
        (np.array(["a"] * 20), "must be numbers"),
    ],
)
def test_bad_labels(y, match):
    C = np.random.default_rng(3).standard_normal((20, 5))
    with pytest.raises(DirectionError, match=match):
        fit_direction(C, y, attribute="Bald")


def test_bad_coefficients():
    y = np.r_[np.zeros(10), np.ones(10)]
    with pytest.raises(DirectionError, match="shape"):
        fit_direction(np.zeros(20), y)
    C = np.random.default_rng(4).standard_normal((20, 5))
    C[3, 2] = np.nan
    with pytest.raises(DirectionError, match="NaN or Inf"):
        fit_direction(C, y)
    with pytest.raises(DirectionError, match="found no direction|does not vary"):
        fit_direction(np.ones((20, 5)), y)  # constant coefficients: nothing to fit


def test_logistic_refuses_numeric_labels(planted):
    C, labels, *_ = planted
    with pytest.raises(DirectionError, match="binary"):
        fit_direction(C, labels["numeric"], method="logistic")


def test_unknown_method_and_option_list_the_known_ones(planted):
    C, labels, *_ = planted
    with pytest.raises(DirectionError, match="known: logistic, lstsq, mean_diff, ridge") as e:
        fit_direction(C, labels["binary"], method="pca")
    assert isinstance(e.value, (W2WError, ValueError))
    with pytest.raises(DirectionError, match="no option alpha; its options: lam"):
        fit_direction(C, labels["binary"], method="ridge", alpha=1.0)
    with pytest.raises(DirectionError, match="options: none"):
        fit_direction(C, labels["binary"], method="lstsq", lam=1.0)
    with pytest.raises(DirectionError, match="lam > 0"):
        fit_direction(C, labels["binary"], method="ridge", lam=0.0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_components_fit_over_the_leading_coefficients_only(planted, method):
    C, labels, *_ = planted
    y = labels["binary"]
    d = fit_direction(C, y, method=method, components=10)
    head = fit_direction(C[:, :10], y, method=method)  # the same fit on the first 10 coefficients alone
    assert d.k == C.shape[1] and d.components == 10 and not d.vector[10:].any()
    assert np.allclose(d.vector[:10], head.vector) and np.isclose(d.score_std, head.score_std)
    assert np.allclose(d.step(2.0)[:10], head.step(2.0))  # an edit moves only the leading coefficients
    assert fit_direction(C, y, method=method, components=10_000).components == C.shape[1]  # K > k: all of them
    with pytest.raises(DirectionError, match="components must be >= 1"):
        fit_direction(C, y, method=method, components=0)
