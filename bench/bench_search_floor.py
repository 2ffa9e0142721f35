"""The floor of a search after a fit at N = 65,000 (issue: p50 < 1 ms at recall@10 = 1.0): what its two
stages cost on this machine, each alone, on in-memory synthetic data (no registry needed).

    python bench/bench_search_floor.py [--n 65000] [--k 1000] [--dim 99648] [--queries 200]

  rerank     the exact re-rank: faiss.fvec_L2sqr of the query against m full vectors (D = --dim) taken at
             random from a 4.8 GB array (so they come from DRAM, as rows of a warm 26 GB store do)
  hnsw       FAISS HNSW (M 48, efConstruction 200) over N coefficient coordinates of k dimensions with a
             decaying spectrum sigma_j = j^-0.5 (as bench_search_fitted's data), for several efSearch:
             p50 per query and how often the true top-10 (by the k-dim distance) is among its 20
  hnsw-sq8   the same graph over 8-bit scalar-quantized coordinates
  trunc-m    HNSW over the first m coordinates only (PCA order: the leading components), n candidates
             rescored on all k coordinates, the best 20 kept: the same figures
Single-threaded, as a search is. Queries are indexed points plus small noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, env_info, log, print_table  # noqa: E402


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=65_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=99_648)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()

    import faiss
    from faiss import swig_ptr

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, results = [], {}

    X = rng.standard_normal((12_000, args.dim), dtype=np.float32)  # 4.8 GB at D = 99,648
    q = rng.standard_normal(args.dim, dtype=np.float32)
    for m in (10, 15, 20, 30):
        picks = iter([rng.choice(len(X), m, replace=False) for _ in range(300)])

        def one(picks=picks, X=X):
            for r in next(picks):
                faiss.fvec_L2sqr(swig_ptr(q), swig_ptr(X[r]), args.dim)

        ms = timed(one, 300)
        results[f"rerank/{m}"] = {"p50_ms": ms}
        rows.append((f"rerank {m} full vectors", f"{ms:.3f}", "-", f"{m * args.dim * 4 / ms / 1e6:.1f} GB/s"))
    del X

    sig = (np.arange(1, args.k + 1) ** -0.5).astype(np.float32)
    Y = rng.standard_normal((args.n, args.k), dtype=np.float32) * sig
    Q = Y[rng.choice(args.n, args.queries, replace=False)]
    Q = Q + 0.01 * rng.standard_normal(Q.shape, dtype=np.float32) * sig
    _, truth = faiss.knn(Q, Y, 10)

    def measure(name: str, search) -> None:
        found, ts = [], []
        for i in range(len(Q)):
            t0 = time.perf_counter()
            found.append(search(i))
            ts.append(time.perf_counter() - t0)
        rec = float(
            np.mean([len(set(f[:20].tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
        )
        ms = float(np.median(ts)) * 1e3
        results[name] = {"p50_ms": ms, "top10_in_20": rec}
        rows.append((name, f"{ms:.3f}", f"{rec:.4f}", ""))
        log(f"{name}: {ms:.3f} ms, {rec:.4f}")

    def build(index, data) -> None:
        index.hnsw.efConstruction = 200
        if not index.is_trained:
            index.train(data)
        faiss.omp_set_num_threads(2)  # building is not what is measured
        index.add(data)
        faiss.omp_set_num_threads(1)

    for label, index in (
        ("hnsw", faiss.IndexHNSWFlat(args.k, 48)),
        ("hnsw-sq8", faiss.IndexHNSWSQ(args.k, faiss.ScalarQuantizer.QT_8bit, 48)),
    ):
        log(f"building {label} over {args.n} x {args.k}")
        build(index, Y)
        for ef in (32, 64, 105):
            index.hnsw.efSearch = ef
            measure(f"{label} ef {ef}", lambda i, ix=index: ix.search(Q[i : i + 1], 20)[1][0])
        del index
    for m in (m for m in (64, 128, 256) if m < args.k):
        log(f"building trunc-{m}")
        Ym = np.ascontiguousarray(Y[:, :m])
        index = faiss.IndexHNSWFlat(m, 32)
        build(index, Ym)
        for n in (50, 100, 200):
            index.hnsw.efSearch = max(n, 32)

            def search(i, ix=index, m=m, n=n):
                cand = ix.search(np.ascontiguousarray(Q[i : i + 1, :m]), n)[1][0]
                d = ((Y[cand] - Q[i]) ** 2).sum(1)
                return cand[np.argsort(d)[:20]]

            measure(f"trunc-{m} n {n}", search)
        del index

    print_table(["stage", "p50 ms", "true top-10 among 20", "note"], rows)
    emit_result({"bench": "search_floor", "n": args.n, "k": args.k, "dim": args.dim, "results": results,
                 "env": env_info()})  # fmt: skip


if __name__ == "__main__":
    main()
