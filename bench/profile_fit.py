"""Where a Gram pass of the fit spends its time: each part against its floor, measured in the same run.

    python bench/profile_fit.py [--n 8192] [--dim 99648] [--k 1000] [--used 4] [--out bench/out]
    OPENBLAS_NUM_THREADS=1 python bench/profile_fit.py ...   # CPU-time shares on a shared machine

On the data file bench_fit.py makes (made here if missing), one Gram pass (P = Z^T Z G, as
w2w.subspace.gram_in_place runs it) is run part by part, serially, block after block:
  read         FileSource.load_into (pread into a reused buffer)   floor: np.copyto of as many bytes
  standardize  (W - mean) / std in place                             floor: np.copyto of as many bytes
  Z G          the (b, D) x (D, l) product                          floor: the same gemm on data in cache
  P += Z^T Y   the (D, b) x (b, l) product added in place (gemm)    floor: the same gemm on data in cache
then the pass as fit runs it (map_in_process: a read that waits for the disk goes on a thread; a read in
line is made by chunks on every core, each chunk standardized while in cache), against the sum of the product
floors; the same pass (the same reads and standardization) with both products by scipy's BLAS
(`scipy.linalg.blas.sgemm`, as sessions 9-15 ran it: scipy carries an OpenBLAS of its own, another build than
numpy's, which w2w.blas.gemm calls); and one
orthogonalization of a block against a basis of `--used` blocks (K^T P, K C twice, _orth, as fit does),
against the floor of its flops at the gemm rate of that shape; and the stats pass as fit runs it
(stats_in_place: the column moments summed by chunks as they are read) against the floor of its product
(the sketch Omega^T W), beside the same pass with the moments taken after the read, from memory (block_moments,
as in session 9). Each part is timed in
wall-clock seconds and in this process's CPU seconds (all its threads): on a loaded machine the wall
clock is noise, and with one BLAS thread (OPENBLAS_NUM_THREADS=1) the CPU seconds are each part's own
work, whatever else runs. It prints figures, it makes no claim.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from bench_fit import FileSource, data_path, make_data
from scipy.linalg.blas import sgemm

from registry.wspace import block_rows_for
from w2w.blas import gemm
from w2w.krylov_basis import KrylovBasis
from w2w.subspace import (
    _orth,
    block_moments,
    default_block,
    gram_in_place,
    map_in_process,
    sketch_rows,
    stats_in_place,
)


class Clock:
    """Wall and CPU seconds since the last tick."""

    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def tick(self) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        out = (t - self.t, c - self.c)
        self.t, self.c = t, c
        return out


def best_of(fn, reps: int = 3) -> np.ndarray:
    """(wall, CPU) seconds, each the least of `reps` runs of fn() (the floor: what the machine does when
    nothing gets in the way)."""
    times = []
    for _ in range(reps):
        clock = Clock()
        fn()
        times.append(clock.tick())
    return np.min(np.array(times), axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=99648)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=0, help="data rows per block; 0 = the registry's ~256 MB")
    ap.add_argument("--used", type=int, default=4, help="Krylov blocks already in the basis when orthogonalizing")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n, D, b = args.n, args.dim, args.rows or block_rows_for(args.dim)
    l = default_block(args.k, 16)  # the fit's default block
    path = data_path(args.out, n, D)
    make_data(path, n, D)
    with open(path, "rb") as f:  # into the page cache first, as bench_fit does: the parts, not the disk
        while f.read(1 << 24):
            pass
    source = FileSource(path, n, D, b)
    specs = source.specs()
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(D).astype(np.float32)
    std = np.abs(rng.standard_normal(D)).astype(np.float32) + 1
    G = np.linalg.qr(rng.standard_normal((D, l)).astype(np.float32))[0]

    # the parts, serially over every block
    P = np.zeros((D, l), dtype=np.float32)
    buf, other = np.empty((b, D), dtype=np.float32), np.empty((b, D), dtype=np.float32)
    names = ("read", "standardize", "Z G", "P += Z^T Y")
    spent = {name: np.zeros(2) for name in names}  # (wall, CPU) seconds
    for spec in specs:
        W = buf[: spec[1] - spec[0]]
        clock = Clock()
        source.load_into(spec, W)
        steps = [clock.tick()]
        W -= mean
        W /= std
        steps.append(clock.tick())
        Y = gemm(W, G)
        steps.append(clock.tick())
        gemm(W, Y, P, trans_a=True, beta=1.0)
        steps.append(clock.tick())
        for name, step in zip(names, steps, strict=True):
            spent[name] += step

    # floors, on one full block in cache, scaled by the number of rows
    scale = n / b
    W = rng.standard_normal((b, D), dtype=np.float32)
    Y = W @ G
    floors = {
        "read": best_of(lambda: np.copyto(other, W)) * scale,
        "standardize": best_of(lambda: np.copyto(other, W)) * scale,
        "Z G": best_of(lambda: W @ G) * scale,
        "P += Z^T Y": best_of(lambda: gemm(W, Y, P, trans_a=True, beta=1.0)) * scale,
    }
    product_floor = floors["Z G"] + floors["P += Z^T Y"]

    clock = Clock()
    gram_in_place(source, specs, mean, std, G)
    whole = clock.tick()
    sums = [P.T]  # (l, D) Fortran-ordered: the sum as sgemm keeps it

    def standardize_rows(rows: np.ndarray, _: int) -> None:
        rows -= mean
        rows /= std

    def scipy_block(spec, Z: np.ndarray) -> None:  # gram_in_place's add_block, both products by scipy's BLAS
        Y = sgemm(1.0, Z.T, G.T, trans_a=1, trans_b=1)
        sums[0] = sgemm(1.0, Y, Z.T, trans_a=1, trans_b=1, beta=1.0, c=sums[0], overwrite_c=1)

    for _ in map_in_process(scipy_block, source, specs, prepare=standardize_rows):  # read as the fit reads
        pass
    scipy_blas = clock.tick()

    # the stats pass: as fit runs it, and with the moments after the read (block_moments, from memory)
    clock = Clock()
    stats_in_place(source, specs, 0, l)
    stats = clock.tick()
    sk = np.zeros((l, D), dtype=np.float32, order="F")
    for spec in specs:
        W = buf[: spec[1] - spec[0]]
        source.load_into(spec, W)
        gemm(sketch_rows(0, spec, l), W, sk, trans_a=True, beta=1.0)
        block_moments(W)
    stats_before = clock.tick()
    omega = sketch_rows(0, (0, b), l)
    sketch_floor = best_of(lambda: gemm(omega, buf, sk, trans_a=True, beta=1.0))
    sketch_floor = sketch_floor * scale

    # one orthogonalization against `used` blocks, as fit does it (in RAM)
    P = rng.standard_normal((D, l)).astype(np.float32)
    with KrylovBasis(D, (args.used + 1) * l) as K:
        for _ in range(args.used):
            K.append(np.linalg.qr(rng.standard_normal((D, l)).astype(np.float32))[0])
        clock = Clock()
        (KtP,) = K.tdot(P)
        K.subtract(P, KtP)
        K.subtract(P, K.tdot(P)[0])
        _orth(P)
        orth = clock.tick()
        used = K.used
    Kc = rng.standard_normal((min(4096, D), used)).astype(np.float32)
    per_flop = best_of(lambda: Kc.T @ P[: Kc.shape[0]]) / (2 * Kc.shape[0] * used * l)
    orth_floor = (4 * 2 * D * used * l + 8 * D * l * l) * per_flop  # K^T P, K C, K^T R, K C; _orth's 4 D l^2 x 2

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"\nGram pass of the fit, N = {n:,}, D = {D:,}, l = {l}, {b}-row blocks, BLAS threads {threads} "
          f"(floors measured in this run; load {os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"{'part':<34} {'wall s':>7} {'floor':>6} {'ratio':>6}   {'cpu s':>7} {'floor':>6} {'ratio':>6}")
    rows = [*((name, spent[name], floors[name]) for name in names),
            ("pass as fit runs it", np.array(whole), product_floor),
            ("the same, scipy's BLAS", np.array(scipy_blas), product_floor),
            ("stats pass as fit runs it", np.array(stats), sketch_floor),
            ("the same, moments after the read", np.array(stats_before), sketch_floor),
            (f"orthogonalize vs {used} columns", np.array(orth), orth_floor)]  # fmt: skip
    for name, t, f in rows:
        r = t / f
        print(f"{name:<34} {t[0]:>7.2f} {f[0]:>6.2f} {r[0]:>6.2f}   {t[1]:>7.2f} {f[1]:>6.2f} {r[1]:>6.2f}")
    print("(read and standardize: floor = a memory copy of the same bytes; products: the same gemm in cache)")


if __name__ == "__main__":
    main()
