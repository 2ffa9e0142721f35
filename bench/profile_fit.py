"""Where a Gram pass of the fit spends its time: each part against its floor, measured in the same run.

    python bench/profile_fit.py [--n 8192] [--dim 99648] [--k 1000] [--used 4] [--out bench/out]

On the data file bench_fit.py makes (made here if missing), one Gram pass (P = Z^T Z G) is run part by
part, serially, block after block:
  read         FileSource.load_into (pread into a reused buffer)   floor: np.copyto of as many bytes
  standardize  (W - mean) / std in place                          floor: np.copyto of as many bytes
  Z G          the (b, D) x (D, l) product                          floor: the same gemm on data in cache
  Y^T Z        the (l, b) x (b, D) product                          floor: the same gemm on data in cache
then the pass as fit runs it (map_in_process: the next block read on a thread), against the sum of the
product floors; and one orthogonalization of a block against a basis of `--used` blocks (K^T P, K C twice,
as fit does), against the floor of its flops at the gemm rate of that shape. Timings on a loaded machine
are noise: run it idle. It prints figures, it makes no claim.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_fit import FileSource, data_path, make_data

from w2w.krylov_basis import KrylovBasis
from w2w.subspace import _standardize_block, block_gram, default_block, map_in_process, sum_blocks


def best_of(fn, reps: int = 3) -> float:
    """The fastest of `reps` runs of fn() (the floor: what the machine does when nothing gets in the way)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=99648)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=384, help="data rows per block (FileSource's default)")
    ap.add_argument("--used", type=int, default=4, help="Krylov blocks already in the basis when orthogonalizing")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n, D, b = args.n, args.dim, args.rows
    l = default_block(args.k, 16)  # the fit's default block
    path = data_path(args.out, n, D)
    make_data(path, n, D)
    source = FileSource(path, n, D, b)
    specs = source.specs()
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(D).astype(np.float32)
    std = np.abs(rng.standard_normal(D)).astype(np.float32) + 1
    G = np.linalg.qr(rng.standard_normal((D, l)).astype(np.float32))[0]

    # the parts, serially over every block
    buf, other = np.empty((b, D), dtype=np.float32), np.empty((b, D), dtype=np.float32)
    parts = {"read": 0.0, "standardize": 0.0, "Z G": 0.0, "Y^T Z": 0.0}
    for spec in specs:
        W = buf[: spec[1] - spec[0]]
        t0 = time.perf_counter()
        source.load_into(spec, W)
        t1 = time.perf_counter()
        Z = _standardize_block(W, mean, std)
        t2 = time.perf_counter()
        Y = Z @ G
        t3 = time.perf_counter()
        np.ascontiguousarray(Y.T) @ Z
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[name] += dt

    # floors, on one full block in cache, scaled by the number of rows
    scale = n / b
    W = rng.standard_normal((b, D), dtype=np.float32)
    Y = W @ G
    Yt = np.ascontiguousarray(Y.T)
    floors = {
        "read": best_of(lambda: np.copyto(other, W)) * scale,
        "standardize": best_of(lambda: np.copyto(other, W)) * scale,
        "Z G": best_of(lambda: W @ G) * scale,
        "Y^T Z": best_of(lambda: Yt @ W) * scale,
    }

    t = time.perf_counter()
    sum_blocks(map_in_process(block_gram, source, specs, (mean, std, G)))
    whole = time.perf_counter() - t
    product_floor = floors["Z G"] + floors["Y^T Z"]

    # one orthogonalization against `used` blocks, as fit does it (in RAM)
    P = rng.standard_normal((D, l)).astype(np.float32)
    with KrylovBasis(D, (args.used + 1) * l) as K:
        for _ in range(args.used):
            K.append(np.linalg.qr(rng.standard_normal((D, l)).astype(np.float32))[0])
        t = time.perf_counter()
        (KtP,) = K.tdot(P)
        K.subtract(P, KtP)
        K.subtract(P, K.tdot(P)[0])
        orth = time.perf_counter() - t
        used = K.used
    Kc = rng.standard_normal((min(4096, D), used)).astype(np.float32)
    rate = 2 * Kc.shape[0] * used * l / best_of(lambda: Kc.T @ P[: Kc.shape[0]])
    orth_floor = 4 * 2 * D * used * l / rate  # K^T P, K C, K^T R, K C: 2 D used l flops each

    print(f"\nGram pass of the fit, N = {n:,}, D = {D:,}, l = {l}, {b}-row blocks (floors measured in this run)")
    print(f"{'part':<34} {'seconds':>8} {'floor s':>8} {'ratio':>6}")
    for name, dt in parts.items():
        print(f"{name:<34} {dt:>8.2f} {floors[name]:>8.2f} {dt / floors[name]:>6.2f}")
    print(f"{'pass as fit runs it (prefetch)':<34} {whole:>8.2f} {product_floor:>8.2f} {whole / product_floor:>6.2f}")
    print(f"{f'orthogonalize vs {used} columns':<34} {orth:>8.2f} {orth_floor:>8.2f} {orth / orth_floor:>6.2f}")
    print("(read and standardize: floor = a memory copy of the same bytes; products: the same gemm in cache)")


if __name__ == "__main__":
    main()
