"""Accuracy per cost of the fit's Krylov shape (depth, block) against an exact reference and torch.svd_lowrank.

    python bench/sweep_fit_accuracy.py [--n 4096] [--dim 20000] [--k 1024] [--decay 0.5 --latent 4000]
        [--shapes 7x5,8x4,...] [--oversample 16] [--niter 2,4] [--out bench/out]

On bench_fit.py's synthetic data (default: a slowly decaying spectrum, latent scales i^-0.5 over 4,000
latents, the regime where the tail of the k components is hard), in memory:
  exact      eigendecomposition of the N x N Gram matrix of the standardized data (float64)
  DxR        w2w.subspace.fit with depth D (Gram passes) and block l = ceil(k / R) + oversample
  torch/i    torch.svd_lowrank(Z, q = max(1024, k + 24), niter = i): bench_fit.py's torch side
For each: passes over the data, product flops in units of N D k (ours: 2 l + 4 l depth; torch: 2 q (2 +
2 niter)), and accuracy: the Ritz/singular values' mean relative error over all k and over the last
quarter, the variance captured by the top k against the exact top k, and the principal angles between
the top j components and the exact top j (mean cos^2 over j = k and j = k/2, smallest cosine at k/2).
Per-component cosines are not reported: at i^-0.5 neighbouring singular values differ by ~1/(2i), so a
single component is ill-defined where a subspace is not. Seconds are printed but on a shared machine
only the flops are a cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_fit import data_path, make_data

from w2w.subspace import ArraySource, FitConfig, fit


def exact(Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(s (k,), V (D, k) float64, total sum of squares) of the standardized Z, through its Gram matrix."""
    Z64 = Z.astype(np.float64)
    evals, U = np.linalg.eigh(Z64 @ Z64.T)
    evals, U = evals[::-1], U[:, ::-1][:, :k]
    s = np.sqrt(np.maximum(evals[:k], 0))
    return s, (Z64.T @ U) / s, float(evals.sum())


def accuracy(s: np.ndarray, V: np.ndarray, ref_s: np.ndarray, ref_V: np.ndarray) -> dict:
    k = len(ref_s)
    rel = np.abs(s[:k] - ref_s) / ref_s
    out = {"sv_err": float(rel.mean()), "sv_err_tail": float(rel[3 * k // 4 :].mean()),
           "captured": float((s[:k] ** 2).sum() / (ref_s**2).sum())}  # fmt: skip
    for j in (k, k // 2):
        c = np.linalg.svd(V[:, :j].T.astype(np.float64) @ ref_V[:, :j], compute_uv=False)
        out[f"cos2_top{j}"] = float((c**2).mean())
        out[f"mincos_top{j}"] = float(c.min())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=20000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--latent", type=int, default=4000)
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--shapes", default="4x3,5x3,6x4,7x5,8x6,10x8,12x10", help="depth x R (l = ceil(k/R) + os)")
    ap.add_argument("--oversample", type=int, default=16)
    ap.add_argument("--niter", default="2,4", help="torch.svd_lowrank power iterations to compare")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    n, D, k = args.n, args.dim, args.k
    path = data_path(args.out, n, D, args.latent, args.decay)
    make_data(path, n, D, latent=args.latent, decay=args.decay)
    X = np.fromfile(path, dtype=np.float32).reshape(n, D)
    mean, std = X.mean(0, dtype=np.float64), X.std(0, ddof=1, dtype=np.float64)
    std[std < 1e-8] = 1
    Z = ((X - mean) / std).astype(np.float32)
    t = time.perf_counter()
    ref_s, ref_V, total = exact(Z, k)
    print(f"exact reference: {time.perf_counter() - t:.1f} s; top {k} hold {(ref_s**2).sum() / total:.4f} "
          f"of the variance (N = {n}, D = {D}, latents {args.latent} at i^-{args.decay:g})", flush=True)  # fmt: skip
    rows = []
    for shape in args.shapes.split(","):
        depth, r = (int(x) for x in shape.split("x"))
        cfg = FitConfig(components=k, depth=depth, block=-(-k // r) + args.oversample, oversample=args.oversample)
        t = time.perf_counter()
        sub = fit(ArraySource(X, 1024), cfg)
        dt = time.perf_counter() - t
        l, dep = sub.config["block"], sub.config["depth"]
        acc = accuracy(sub.singular_values, np.asarray(sub.components), ref_s, ref_V)
        rows.append({"side": f"ours {dep}x{r}", "l": l, "m": l * dep, "passes": 1 + dep,
                     "flops_ndk": (2 * l + 4 * l * dep) / k, "seconds": dt, **acc})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    Zt = torch.from_numpy(Z)
    q = max(1024, k + 24)
    for niter in (int(x) for x in args.niter.split(",") if x):
        torch.manual_seed(0)
        t = time.perf_counter()
        _, S, V = torch.svd_lowrank(Zt, q=q, niter=niter)
        dt = time.perf_counter() - t
        acc = accuracy(S.double().numpy(), V.numpy(), ref_s, ref_V)
        rows.append({"side": f"torch/{niter}", "l": q, "m": q, "passes": 2 + 2 * niter,
                     "flops_ndk": 2 * q * (2 + 2 * niter) / k, "seconds": dt, **acc})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nfit accuracy at N = {n}, D = {D}, k = {k} (decay {args.decay:g}, {args.latent} latents)")
    print(f"{'side':<12} {'l':>5} {'m':>6} {'passes':>6} {'flops/NDk':>9} {'s':>6} {'sv err':>9} {'tail err':>9} "
          f"{'captured':>9} {'cos2 k':>8} {'cos2 k/2':>8} {'min cos k/2':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['side']:<12} {r['l']:>5} {r['m']:>6} {r['passes']:>6} {r['flops_ndk']:>9.1f} {r['seconds']:>6.1f} "
              f"{r['sv_err']:>9.2e} {r['sv_err_tail']:>9.2e} {r['captured']:>9.6f} {r[f'cos2_top{k}']:>8.5f} "
              f"{r[f'cos2_top{k // 2}']:>8.5f} {r[f'mincos_top{k // 2}']:>11.5f}")  # fmt: skip
    print("RESULT " + json.dumps({"bench": "fit_accuracy", "n": n, "dim": D, "k": k, "rows": rows}))


if __name__ == "__main__":
    main()
