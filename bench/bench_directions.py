"""Which direction method recovers a planted attribute best: the measurement behind DEFAULT_METHOD.

    python bench/bench_directions.py [--seeds 3] [--quick]

Planted data, built in WEIGHT space (the subspace is then fitted the paper's way, as for real models):
  * latent identity factors z ~ N(0, I_m), m = 8;
  * weights w = mean + L z + noise, L = diag(s) U diag(g) (D, m): U a Gaussian (D, m) basis, s a
    per-parameter scale, log-uniform over 1e-3..1 (like LoRA A vs B factors, which differ by orders of
    magnitude), g the strength of each factor in the weights, and noise per parameter with its own
    log-uniform std (training noise that does not follow s), so the signal-to-noise ratio of a parameter
    spans orders of magnitude and z-scoring lifts pure-noise parameters to unit variance;
  * two families of g: "equal" (g = 1) and "decaying" (g geometric from 1 to 0.1: some identity factors
    are weakly expressed, as the decaying PCA spectrum of real models suggests);
  * attributes are known linear functions of z: binary y = 1[a . z + eps > 0], numeric y = b . z + eps
    (a, b random unit vectors, eps ~ N(0, 0.5^2)).
Subspace: z-score every column over the N models, SVD, keep k > m components (c = ((w - mean)/std) @ V_k).
Measure, per method: fit d on (C, y); the edit c -> c + t d changes the weights by dw = t (V_k d) * std;
recover the latent change dz = argmin ||L dz - dw|| and report cos(dz, a) (signed: a wrong sign is < 0).
1 means the edit moves exactly the planted attribute and no other identity factor. Also reported: the
held-out quality of the score c @ d on fresh models (AUC for binary, Pearson r for numeric).
Settings: N in {200, 1000, 4000} x k in {50, 200, ~0.9 min(N, D)} (k < N only), seeds averaged.
The default is the method with the best mean cosine over every cell (families, settings, both attributes)
among the methods that take both binary and numeric labels.

Runs with the CPU's BLAS threads; about 7 minutes on 2 cores (`--quick`: 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from w2w.directions import DEFAULT_METHOD, METHODS, fit_direction  # noqa: E402

D, M = 2000, 8
K_CAP = 1000  # k close to N at N = 4000 would need D > 4000 and minutes-long SVDs per fit on a laptop
N_TEST = 2000
LABEL_NOISE = 0.5
FAMILIES = {"equal": np.ones(M), "decaying": np.geomspace(1.0, 0.1, M)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class World:
    """The planted generative model: w = mean + L z + noise_sd * eps."""

    mean: np.ndarray  # (D,)
    L: np.ndarray  # (D, m) loadings
    noise_sd: np.ndarray  # (D,)
    a: np.ndarray  # (m,) binary attribute's direction, unit
    b: np.ndarray  # (m,) numeric attribute's direction, unit

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """n models (n, D) and their labels {"binary": (n,), "numeric": (n,)}."""
        z = rng.standard_normal((n, M))
        W = self.mean + z @ self.L.T + rng.standard_normal((n, D)) * self.noise_sd
        eps = rng.standard_normal((2, n)) * LABEL_NOISE
        return W, {"binary": (z @ self.a + eps[0] > 0).astype(float), "numeric": z @ self.b + eps[1]}


def loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def make_world(rng: np.random.Generator, g: np.ndarray, d: int = D) -> World:
    s = loguniform(rng, 1e-3, 1.0, d)  # per-parameter scale
    U = rng.standard_normal((d, M)) / np.sqrt(M)  # rows of unit norm on average
    noise_sd = loguniform(rng, 1e-3, 1.0, d) * 0.5
    a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((2, M)))
    return World(mean=rng.standard_normal(d) * s, L=(s[:, None] * U) * g[None, :], noise_sd=noise_sd, a=a, b=b)


def fit_subspace(W: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's space: z-scored columns, top-k right singular vectors. -> mean (D,), std (D,), V (D, k).

    The singular vectors come from eigh of the smaller Gram matrix (same subspace as an SVD of Z, several
    times faster here; the top k are far above the rounding this costs).
    """
    mean, std = W.mean(axis=0), W.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    Z = (W - mean) / std  # (N, D)
    if Z.shape[0] >= Z.shape[1]:
        _, V = np.linalg.eigh(Z.T @ Z)  # (D, D), ascending
        V = V[:, ::-1][:, :k]
    else:
        lam, Uz = np.linalg.eigh(Z @ Z.T)  # (N, N), ascending
        lam, Uz = lam[::-1][:k], Uz[:, ::-1][:, :k]
        V = (Z.T @ Uz) / np.sqrt(lam)  # right singular vectors from left ones
    return mean, std, V


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U); scores are continuous, so ties are negligible."""
    r = np.empty(score.size)
    r[np.argsort(score)] = np.arange(1, score.size + 1)
    n1 = y.sum()
    n0 = y.size - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ks_for(n: int) -> list[int]:
    top = min(int(0.9 * min(n, D)), K_CAP)
    return [k for k in (50, 200) if k < top] + [top]


def run_cell(world: World, n: int, seed: int, methods: list[str]) -> list[dict]:
    """One (world, N, seed): the subspace once, then every k, attribute and method."""
    rng = np.random.default_rng(1000 + seed)
    W, labels = world.sample(n, rng)
    Wt, labels_t = world.sample(N_TEST, rng)
    pinv_L = np.linalg.pinv(world.L)  # (m, D): least-squares recovery of a latent change
    kmax = max(ks_for(n))
    mean, std, V = fit_subspace(W, kmax)
    Q, _ = np.linalg.qr(world.L / std[:, None])  # (D, m): the latent factors' span in z-scored space
    Z, Zt = (W - mean) / std, (Wt - mean) / std
    rows = []
    for k in ks_for(n):
        C, Ct = Z @ V[:, :k], Zt @ V[:, :k]  # (N, k), (N_TEST, k)
        for attr, target in (("binary", world.a), ("numeric", world.b)):
            for method in methods:
                if method == "logistic" and attr == "numeric":
                    continue
                t0 = time.perf_counter()
                d = fit_direction(C, labels[attr], method=method, attribute=attr)
                secs = time.perf_counter() - t0
                dz = pinv_L @ ((V[:, :k] @ d.vector) * std)  # (m,) latent change of a unit edit
                cos = float(dz @ target / np.linalg.norm(dz))
                on_latent = float(np.linalg.norm(Q.T @ (V[:, :k] @ d.vector)))  # share of the unit edit
                st = d.scores(Ct)
                held = auc(st, labels_t[attr]) if attr == "binary" else float(np.corrcoef(st, labels_t[attr])[0, 1])
                rows.append(
                    dict(n=n, k=k, attr=attr, method=method, seed=seed, cos=cos, held=held, on=on_latent, secs=secs)
                )
    return rows


def markdown(rows: list[dict], methods: list[str], cols: list[tuple[int, int]], key: str, attr: str) -> str:
    head = "| method | " + " | ".join(f"N={n} k={k}" for n, k in cols) + " | mean |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for m in methods:
        cells, means = [], []
        for n, k in cols:
            v = [r[key] for r in rows if (r["method"], r["n"], r["k"], r["attr"]) == (m, n, k, attr)]
            if not v:
                cells.append("n/a")
                continue
            means.append(np.mean(v))
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(means):.3f} |" if means else f"| {m} | n/a |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N in {200, 1000}, 1 seed: a smoke run")
    args = ap.parse_args()
    ns = [200, 1000] if args.quick else [200, 1000, 4000]
    seeds = 1 if args.quick else args.seeds
    methods = list(METHODS)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for fam, g in FAMILIES.items():
        for seed in range(seeds):
            world = make_world(np.random.default_rng(seed), g)
            for n in ns:
                log(f"{fam} seed {seed} N={n}")
                rows += [dict(r, family=fam) for r in run_cell(world, n, seed, methods)]
    cols = [(n, k) for n in ns for k in ks_for(n)]

    print(
        f"\nPlanted anisotropic data: D={D}, m={M} latent factors, {seeds} seed(s) per cell, {N_TEST} held-out models."
    )
    print("Values: mean ± std over seeds. 'mean' column: mean over the settings.\n")
    for fam in FAMILIES:
        fr = [r for r in rows if r["family"] == fam]
        for attr in ("binary", "numeric"):
            print(f"**Latent cosine with the planted direction, {fam} loadings, {attr} attribute**\n")
            print(markdown(fr, methods, cols, "cos", attr) + "\n")

    def avg(key: str, **match: object) -> float:
        v = [r[key] for r in rows if all(r[f] == x for f, x in match.items())]
        return float(np.mean(v)) if v else float("nan")

    print(
        "**Summary per method** (means over every setting and seed; cosines over both attributes; "
        "held-out: AUC for binary, Pearson r for numeric; on-latent: share of the z-scored edit inside the "
        "planted factors' span; logistic's cosines are binary-only)\n"
    )
    print("| method | cos equal | cos decaying | cos all | held-out AUC | held-out r | on-latent | fit ms |")
    print("|---|---|---|---|---|---|---|---|")
    overall = {m: avg("cos", method=m) for m in methods}
    for m in methods:
        cells = [avg("cos", method=m, family=f) for f in FAMILIES] + [overall[m]]
        cells += [avg("held", method=m, attr="binary"), avg("held", method=m, attr="numeric"), avg("on", method=m)]
        print(
            f"| {m} | "
            + " | ".join("n/a" if np.isnan(c) else f"{c:.3f}" for c in cells)
            + f" | {1000 * avg('secs', method=m):.0f} |"
        )

    both = [m for m in methods if m != "logistic"]  # the default must take numeric labels too
    binary_only = {m: avg("cos", method=m, attr="binary") for m in methods}
    held = {m: avg("held", method=m) for m in methods}
    worst = {
        m: float(min(avg("cos", method=m, family=f, n=n, k=k) for f in FAMILIES for n, k in cols)) for m in methods
    }
    best = max(both, key=lambda m: overall[m])
    print(
        f"\nbest (recovers the planted direction best, takes both label kinds): {best}; "
        f"DEFAULT_METHOD is {DEFAULT_METHOD!r}{'' if best == DEFAULT_METHOD else ' (MISMATCH)'}"
    )
    secs = time.perf_counter() - t0
    result = dict(
        bench="directions",
        best=best,
        default=DEFAULT_METHOD,
        mean_cos=overall,
        mean_cos_binary=binary_only,
        mean_held=held,
        worst_cell_cos=worst,
        seeds=seeds,
        ns=ns,
        d=D,
        m=M,
        seconds=round(secs, 1),
        fit_seconds={m: round(float(np.mean([r["secs"] for r in rows if r["method"] == m])), 4) for m in methods},
        env=dict(python=platform.python_version(), numpy=np.__version__, cpus=os.cpu_count()),
    )
    print("RESULT " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
