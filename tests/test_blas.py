"""w2w.blas.gemm: numpy's own BLAS through its CBLAS entry point, every layout the fit hands it, against
float64 products; and its fallback (matmul and an add) where numpy carries no such library."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from w2w import blas
from w2w.blas import gemm

EPS32 = float(np.finfo(np.float32).eps)


def layouts(X: np.ndarray) -> dict[str, np.ndarray]:
    """X as C-ordered, Fortran-ordered, and a slice of a wider array of each order (a leading dimension
    larger than its width)."""
    r, c = X.shape
    wide_c = np.zeros((r, c + 5), dtype=np.float32)
    wide_c[:, 2 : 2 + c] = X
    wide_f = np.zeros((r + 3, c), dtype=np.float32, order="F")
    wide_f[1 : 1 + r] = X
    return {"C": np.ascontiguousarray(X), "F": np.asfortranarray(X), "C-slice": wide_c[:, 2 : 2 + c],
            "F-slice": wide_f[1 : 1 + r]}  # fmt: skip


def bound(A: np.ndarray, B: np.ndarray, k: int) -> np.ndarray:
    """Elementwise bound on a float32 product's error: k u (|A| |B|) (Higham's gamma_k, with room for the
    blocked summation order)."""
    return 2 * k * EPS32 * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))) + 1e-30


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)))
def test_every_layout_and_transpose_against_float64(trans_a: bool, trans_b: bool) -> None:
    rng = np.random.default_rng(0)
    m, n, k = 37, 23, 301
    opA = rng.standard_normal((m, k)).astype(np.float32)
    opB = rng.standard_normal((k, n)).astype(np.float32)
    C0 = rng.standard_normal((m, n)).astype(np.float32)
    exact = opA.astype(np.float64) @ opB.astype(np.float64)
    tol = bound(opA, opB, k)
    A_store, B_store = (opA.T if trans_a else opA), (opB.T if trans_b else opB)
    for (la, A), (lb, B) in itertools.product(layouts(A_store).items(), layouts(B_store).items()):
        got = gemm(A, B, trans_a=trans_a, trans_b=trans_b)
        assert got.flags.c_contiguous and got.dtype == np.float32
        assert np.all(np.abs(got - exact) <= tol), (la, lb)
        for order in "CF":
            out = np.array(C0, order=order)
            res = gemm(A, B, out, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0)
            assert res is out  # in out's buffer, whatever its order
            want = 0.5 * exact + 2.0 * C0
            assert np.all(np.abs(out - want) <= 0.5 * tol + 4 * EPS32 * np.abs(want)), (la, lb, order)


def test_sums_into_out_block_by_block() -> None:
    """The fit's use: P += C_b^T (C_b G) over blocks equals Z^T Z G."""
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((90, 400)).astype(np.float32)
    G = rng.standard_normal((400, 7)).astype(np.float32)
    P = np.zeros((400, 7), dtype=np.float32)
    for lo in range(0, 90, 32):
        C = Z[lo : lo + 32]
        gemm(C, gemm(C, G), P, trans_a=True, beta=1.0)
    exact = Z.T.astype(np.float64) @ (Z.astype(np.float64) @ G)
    assert np.abs(P - exact).max() <= 1e-4 * np.abs(exact).max()


def test_numpy_wheels_library_is_the_one_called() -> None:
    """numpy's PyPI wheels carry scipy-openblas: there gemm must call it (the speed is the point), not fall
    back."""
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if not str(info.get("name", "")).startswith("scipy-openblas"):
        pytest.skip(f"numpy here is built on {info.get('name')}: gemm falls back to matmul")
    assert blas._cblas_sgemm() is not None


def test_fallback_without_numpys_cblas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "_cblas_sgemm", lambda: None)
    rng = np.random.default_rng(2)
    A = rng.standard_normal((40, 11)).astype(np.float32)
    B = rng.standard_normal((40, 6)).astype(np.float32)
    out = np.ones((11, 6), dtype=np.float32, order="F")
    gemm(A, B, out, trans_a=True, alpha=-1.0, beta=3.0)
    want = 3.0 - A.T.astype(np.float64) @ B
    assert np.all(np.abs(out - want) <= bound(A.T, B, 40) + 4 * EPS32 * np.abs(want))
    assert np.array_equal(gemm(A, B, trans_a=True), (A.T @ B))


def test_empty_and_bad_arguments() -> None:
    out = np.full((3, 4), 7.0, dtype=np.float32)
    gemm(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), out, beta=1.0)
    assert np.all(out == 7.0)  # an empty sum adds nothing
    with pytest.raises(TypeError, match="float32"):
        gemm(np.zeros((2, 2)), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="op\\(A\\) is 2 x 3"):
        gemm(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="out is"):
        gemm(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="C- or Fortran-ordered"):
        gemm(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros((2, 4), np.float32)[:, ::2])
