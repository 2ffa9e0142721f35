"""float32 products in numpy's own BLAS, added into an existing array: out = alpha op(A) op(B) + beta out.

numpy's matmul has no beta (a block's product would be made as a new array and then added: at D = 99,648
and l = 350 that is 140 MB of traffic per block), and scipy's `sgemm`, which has one, calls scipy's own
OpenBLAS: a second library with its own thread pool, whose threads spin after a call and take the cores
from numpy's (the fit's other products are numpy's), and a different build. On an AVX2 EPYC, numpy 2.4's
OpenBLAS 0.3.31 ran the Gram pass's two products 1.08-1.3x as fast as scipy 1.17's 0.3.30 (each alone in a
process; the gap moved with the machine's speed), a whole pass 1.04-1.09x (bench/profile_fit.py, "the
same, scipy's BLAS"). So `gemm` calls numpy's
library through its CBLAS entry point (the file numpy's wheel ships, its symbols named the way threadpoolctl
looks for them); where numpy carries no such library (a build on another BLAS), it falls back to matmul
and an add, which is correct everywhere and costs a temporary.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_F32 = np.dtype(np.float32)


@functools.cache
def _cblas_sgemm() -> Callable | None:
    """numpy's cblas_sgemm as a ctypes function (ints of the library's width), or None."""
    root = Path(np.__file__).parent
    files = [*sorted(root.parent.glob("numpy.libs/*openblas*")), *sorted(root.glob(".dylibs/*openblas*"))]
    for path in files:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        # scipy-openblas wheels prefix their symbols with scipy_ and ILP64 builds suffix them (threadpoolctl's
        # list of affixes)
        for prefix, suffix in itertools.product(("scipy_", ""), ("64_", "_64", "")):
            fn = getattr(lib, f"{prefix}cblas_sgemm{suffix}", None)
            if fn is None:
                continue
            i, f, p = (ctypes.c_int64 if suffix else ctypes.c_int), ctypes.c_float, ctypes.c_void_p
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, f, p, i, p, i, f, p, i]
            fn.restype = None
            return fn
    return None


def _as_operand(X: np.ndarray, trans: bool) -> tuple[np.ndarray, int, int]:
    """(array, CBLAS transpose flag, leading dimension) for op(X) read as row-major: X itself when one of its
    strides is one element (C- or Fortran-ordered, or a slice of either), else a C-ordered copy."""
    rows, cols = X.shape
    if X.strides[1] == 4 and X.strides[0] >= 4 * max(cols, 1) and X.strides[0] % 4 == 0:
        return X, _TRANS if trans else _NO_TRANS, X.strides[0] // 4
    if X.strides[0] == 4 and X.strides[1] >= 4 * max(rows, 1) and X.strides[1] % 4 == 0:
        return X, _NO_TRANS if trans else _TRANS, X.strides[1] // 4  # X^T is row-major
    X = np.ascontiguousarray(X)
    return X, _TRANS if trans else _NO_TRANS, max(cols, 1)


def gemm(
    A: np.ndarray,
    B: np.ndarray,
    out: np.ndarray | None = None,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> np.ndarray:
    """out = alpha op(A) op(B) + beta out for float32 matrices, in out's buffer (a new C-ordered array when
    out is None), op(X) = X.T where trans_x. out must be C- or Fortran-ordered and share no memory with A or
    B; A and B are read where they lie when either stride is one element."""
    for X in (A, B):
        if X.dtype != _F32 or X.ndim != 2:
            raise TypeError(f"gemm takes 2-D float32 arrays, got {X.dtype} of {X.ndim} dimensions")
    m, k = A.shape[::-1] if trans_a else A.shape
    k2, n = B.shape[::-1] if trans_b else B.shape
    if k != k2:
        raise ValueError(f"gemm: op(A) is {m} x {k}, op(B) is {k2} x {n}")
    if out is None:
        out, beta = np.empty((m, n), dtype=np.float32), 0.0
    if out.shape != (m, n) or out.dtype != _F32:
        raise ValueError(f"gemm: out is {out.dtype} {out.shape}, the product is float32 {(m, n)}")
    if not out.flags.c_contiguous:
        if not out.flags.f_contiguous:
            raise ValueError("gemm: out must be C- or Fortran-ordered")
        # out^T (C-ordered) = op(B)^T op(A)^T
        gemm(B, A, out.T, trans_a=not trans_b, trans_b=not trans_a, alpha=alpha, beta=beta)
        return out
    sgemm = _cblas_sgemm()
    if sgemm is None or 0 in (m, n, k):
        prod = (A.T if trans_a else A) @ (B.T if trans_b else B)
        if beta == 0.0:
            np.multiply(prod, alpha, out=out)
        else:
            out *= beta
            out += prod if alpha == 1.0 else alpha * prod
        return out
    A, ta, lda = _as_operand(A, trans_a)
    B, tb, ldb = _as_operand(B, trans_b)
    sgemm(_ROW_MAJOR, ta, tb, m, n, k, alpha, A.ctypes.data, lda, B.ctypes.data, ldb, beta, out.ctypes.data, max(n, 1))
    return out
