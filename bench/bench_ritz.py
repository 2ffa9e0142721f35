"""The fit's final step (w2w.rayleigh_ritz.ritz) by each LAPACK route: seconds and memory, side by side.

The step finds the top k eigenpairs of an m x m float64 matrix; at the paper's k = 10,000 (m = 16,750) it is
the longest step of the fit. A Krylov space's Ritz values are a signal part and a flat tail of close values
(the noise's bulk), and LAPACK's dsyevr asked for an index range takes bisection and inverse iteration there,
which reorthogonalizes within clusters of close eigenvalues. Here M has that spectrum (a tenth of the values
spread from 100 to 10, the rest in [1, 1.01]) and dense eigenvectors (diag(values) turned by 4 Householder
reflections, in place); the whitening blocks are identities. Each driver runs in its own process:

    python bench/bench_ritz.py --m 8000 --k 4800                     # evd, evr and evr-range
    python bench/bench_ritz.py --m 16750 --k 10000 --drivers evr     # the paper's shape (~4.5 GB)

Prints seconds, the peak RSS above the process with M built, the plan's figure for the step beside M
(w2w.fit_plan), the largest relative error of the top-k values, and each driver's time against evr-range's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from common import emit_result, env_info, log, print_table


def make_m(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(M with its upper triangle filled, its eigenvalues): no m x m temporaries beside M."""
    from scipy.linalg.blas import dsymv, dsyr2

    rng = np.random.default_rng(seed)
    values = np.concatenate([np.linspace(100.0, 10.0, m // 10), 1 + 0.01 * rng.random(m - m // 10)])
    M = np.zeros((m, m), order="F")
    M[np.diag_indices(m)] = values
    for _ in range(4):  # M <- H M H, H = I - 2 v v^T: M + v y^T + y v^T with y = -2 M v + 2 (v^T M v) v
        v = rng.standard_normal(m)
        v /= np.linalg.norm(v)
        w = dsymv(1.0, M, v, lower=1)
        M = dsyr2(1.0, v, -2 * w + 2 * (v @ w) * v, a=M, lower=1, overwrite_a=1)
    # M's lower triangle (Fortran order) is its transpose's upper one, C-ordered: what ritz takes, no copy
    return M.T, np.sort(values)[::-1]


def child(args) -> None:
    from w2w.fit_plan import FitPlan, rss_bytes
    from w2w.krylov_basis import chunk_rows
    from w2w.rayleigh_ritz import ritz

    M, values = make_m(args.m)
    l, depth = args.m // args.depth, args.depth
    plan = FitPlan(args.m, args.m, args.k, l, depth, 1, out_of_core=True, ritz_driver=args.child)
    # the step's figure beside M, less the basis's read buffers (not here)
    counted = plan.phases(True)["ritz"] - 8 * args.m**2 - 4 * chunk_rows(args.m) * args.m
    base = rss_bytes()
    t = time.perf_counter()
    theta, Q, how = ritz(M, [np.eye(l) for _ in range(depth)], args.k, args.child)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    err = float(np.abs(theta - values[: args.k]).max() / values[0])
    print(json.dumps({"seconds": seconds, "peak": peak, "counted": counted, "err": err, "how": how}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=8000)
    p.add_argument("--k", type=int, default=4800)
    p.add_argument("--depth", type=int, default=5, help="whitening blocks (the fit's Krylov blocks)")
    p.add_argument("--drivers", default="evd,evr,evr-range")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    res = {}
    for driver in args.drivers.split(","):
        log(f"ritz by {driver}, m = {args.m:,}, top {args.k:,}")
        cmd = [sys.executable, __file__, "--m", str(args.m), "--k", str(args.k), "--depth", str(args.depth),
               "--child", driver]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        res[driver] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = res.get("evr-range", {}).get("seconds")
    rows = [[d, round(r["seconds"], 1), f"{r['peak'] / 1e9:.2f} GB", f"{r['counted'] / 1e9:.2f} GB", f"{r['err']:.1e}",
             f"{r['seconds'] / ref:.2f}x" if ref else "-"] for d, r in res.items()]  # fmt: skip
    print_table(["driver", "seconds", "peak above M", "plan (beside M)", "max rel. err", "vs evr-range"], rows,
                title=f"ritz: top {args.k:,} of m = {args.m:,} (float64)")  # fmt: skip
    emit_result({"bench": "ritz", "m": args.m, "k": args.k, "drivers": res, "env": env_info()})


if __name__ == "__main__":
    main()
