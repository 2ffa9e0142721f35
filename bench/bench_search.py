"""k=10 search latency over a registry of imported w2w LoRAs vs a plain numpy brute-force scan.

    python bench/bench_search.py [--n 2000] [--queries 200] [--queries-unfiltered 80] [--out DIR]

Each query is a model of the registry, by name (so it is excluded from its own results). Per query,
in rotating order so machine noise hits every side alike:
  * ours      - Registry.search(name, k=10, where=...): resolves the name, runs the DuckDB filter,
                reads the row table, scans the vector store (registry.search.knn), looks the hits up;
  * knn       - the bare engine registry.search.knn on the same rows (all rows but the query's own,
                or the filtered ones), with rows and norms prepared outside the timing;
  * knn-contig (unfiltered only, diagnostic) - knn over all rows (no hole for the query's own row,
                so the engine's whole-range fast path) with k+1, the query's own row dropped afterwards;
  * numpy     - the baseline: X (N, D) float32 loaded once outside the timing (X[subset] for the
                filter, precomputed), per query np.linalg.norm(X - q, axis=1) + argpartition/argsort.
Results must agree with the baseline (same ids, same order); the agreement rate is printed, and each
disagreement is settled (outside the timing) against exact float64 distances: the baseline ranks in
float32, so a near-tie can flip its order.
The filter is `age > P90(age)` (about 10% of models), computed from attributes.csv.
Peak RSS of the search path and of the baseline are measured in child processes.

Unfiltered queries scan all N*D floats (about 0.8 GB at n=2000) four times per query (three sides and
the diagnostic), about 1 s in all on 2 cores, so their count defaults to 80 (--queries-unfiltered 200
for the full set: about 2 more minutes); filtered queries use --queries (200). For small n both default
to n/10 (at least 5), so --n 50 takes seconds. A registry rebuild (after a library change) adds ~20-40 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_OUT,
    emit_result,
    ensure_loras,
    ensure_registry,
    env_info,
    log,
    pct,
    print_table,
    read_attributes,
    rounded,
    warm_page_cache,
)

K = 10
SEED = 0
UNFILTERED_DEFAULT = 80  # each unfiltered query costs about 1 s in all (mostly the numpy baseline)


# --- setup shared by the parent and the RSS children ---------------------------------------------


class Setup:
    """The registry, its one space, the row table and the query set (all outside any timing)."""

    def __init__(self, root: Path, csv_path: Path, n_queries: int):
        from registry.registry import Registry
        from w2w.layout import Layout

        self.reg = Registry.open(root)
        spaces = self.reg.spaces()
        assert len(spaces) == 1, f"expected one space, found {len(spaces)}"
        self.space = spaces[0]
        self.store = self.reg.store(self.space)
        self.layout = Layout.from_json(self.space.layout_json)
        with self.reg.catalog.connect() as con:
            rows = con.execute(
                "SELECT id, name, row_idx, sq_norm FROM models WHERE space_id = ? ORDER BY row_idx", [self.space.id]
            ).fetchall()
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.names = [r[1] for r in rows]
        self.rows = np.array([r[2] for r in rows], dtype=np.int64)
        self.sq = np.array([r[3] for r in rows], dtype=np.float64)
        assert np.array_equal(self.rows, np.arange(len(rows))), "row_idx is not 0..N-1"
        self.n = len(rows)
        ages = np.array([float(a["age"]) for a in read_attributes(csv_path).values()])
        self.age_threshold = float(np.percentile(ages, 90))
        self.where = f"age > {self.age_threshold!r}"
        rng = np.random.default_rng(SEED)
        self.query_rows = rng.choice(self.n, size=min(n_queries, self.n), replace=False)

    def filter_rows(self) -> np.ndarray:
        allowed = np.asarray(self.reg.catalog.filter_ids(self.where, self.space.id), dtype=np.int64)
        return self.rows[np.isin(self.ids, allowed)]

    def load_matrix(self) -> np.ndarray:
        return self.store.read(self.rows)  # (N, D) float32, in memory


def numpy_topk(X: np.ndarray, q: np.ndarray, k: int, self_pos: int | None) -> np.ndarray:
    """Positions in X of the k rows nearest q, nearest first, skipping self_pos (the baseline)."""
    d = np.linalg.norm(X - q, axis=1)
    kk = min(k + 1, len(d))
    idx = np.argpartition(d, kk - 1)[:kk]
    idx = idx[np.argsort(d[idx], kind="stable")]
    return idx[idx != self_pos][:k] if self_pos is not None else idx[:k]


# --- the timed comparison ------------------------------------------------------------------------


def engine():
    """registry.search.knn, called as the library's own Registry.search calls it (its signature changes)."""
    import inspect

    from registry.search import knn

    has_contiguous = "contiguous" in inspect.signature(knn).parameters

    def call(s: Setup, q: np.ndarray, k: int, rows: np.ndarray, sq: np.ndarray, all_rows: bool = False):
        kw = {"contiguous": all_rows} if has_contiguous else {}
        return knn(s.store, q, k, "l2", s.layout, rows, sq, **kw)

    return call


def settle(s: Setup, Xb, sub_rows, qrow: int, q, results: dict, mismatch: list[str]) -> dict:
    """Outside the timing: which answer is right? Exact float64 distances, ties broken by row."""
    keep_pos = np.flatnonzero(sub_rows != qrow)
    d64 = np.sqrt(((Xb[keep_pos].astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1))
    exact = s.ids[sub_rows[keep_pos[np.lexsort((sub_rows[keep_pos], d64))[:K]]]].tolist()
    d_of = dict(zip(s.ids[sub_rows[keep_pos]].tolist(), d64.tolist(), strict=True))
    gaps = [
        abs(d_of[a] - d_of[b]) / max(d_of[a], 1e-30)
        for sd in mismatch
        for a, b in zip(results[sd], results["numpy"], strict=False)
        if a != b
    ]
    return {
        "sides": mismatch,
        "exact": [sd for sd in results if results[sd] == exact],
        "max_rel_gap": max(gaps, default=0.0),
    }


def run_mode(s: Setup, X: np.ndarray, filtered: bool, n_queries: int) -> dict:
    knn = engine()
    if filtered:
        sub_rows = s.filter_rows()
        Xb = X[sub_rows]  # the baseline's subset, precomputed outside the timing
    else:
        sub_rows, Xb = s.rows, X
    pos_of_row = {int(r): i for i, r in enumerate(sub_rows)}
    where = s.where if filtered else None
    sides = ["ours", "knn", "numpy"] + ([] if filtered else ["knn-contig"])
    times: dict[str, list[float]] = {k: [] for k in sides}
    agree = dict.fromkeys(sides, 0)
    mismatches: list[dict] = []
    for qi, qrow in enumerate(s.query_rows[:n_queries]):
        qrow = int(qrow)
        name, q = s.names[qrow], X[qrow]
        self_pos = pos_of_row.get(qrow)
        keep = sub_rows != qrow  # what Registry.search scans: the allowed rows minus the query itself
        rows_k, sq_k = sub_rows[keep], s.sq[sub_rows][keep]
        results: dict[str, list[int]] = {}
        order = sides[qi % len(sides) :] + sides[: qi % len(sides)]  # rotate who goes first
        for side in order:
            t0 = time.perf_counter()
            if side == "ours":
                res = s.reg.search(name, k=K, where=where)
                dt = time.perf_counter() - t0
                results[side] = [h.model.id for h in res.hits]
            elif side == "knn":
                found, _ = knn(s, q, K, rows_k, sq_k)
                dt = time.perf_counter() - t0
                results[side] = s.ids[found].tolist()
            elif side == "knn-contig":
                found, _ = knn(s, q, K + 1, s.rows, s.sq, all_rows=True)
                found = found[found != qrow][:K]
                dt = time.perf_counter() - t0
                results[side] = s.ids[found].tolist()
            else:
                idx = numpy_topk(Xb, q, K, self_pos)
                dt = time.perf_counter() - t0
                results[side] = s.ids[sub_rows[idx]].tolist()
            times[side].append(dt)
        for side in sides:
            agree[side] += results[side] == results["numpy"]
        if mismatch := [sd for sd in sides if results[sd] != results["numpy"]]:
            mm = settle(s, Xb, sub_rows, qrow, q, results, mismatch)
            mismatches.append({"query": name, **mm})
            log(f"query {name}: {mismatch} differ from numpy; float64 reference agrees with {mm['exact']}")
    nq = len(times["numpy"])
    stats = {
        sd: {"p50_ms": pct(t, 50) * 1e3, "p99_ms": pct(t, 99) * 1e3, "mean_ms": float(np.mean(t)) * 1e3}
        for sd, t in times.items()
    }
    return {
        "filtered": filtered,
        "where": where,
        "rows_scanned": len(sub_rows),
        "queries": nq,
        "stats": stats,
        "agreement": {sd: agree[sd] / nq for sd in sides},
        "mismatches": mismatches,
    }


# --- peak RSS, in child processes ----------------------------------------------------------------


class RssSampler:
    """Peak RssAnon/RssFile of this process, sampled every few ms from /proc/self/status."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = _rss_parts()
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _rss_parts() -> tuple[int, int]:
    anon = file = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def vm_hwm() -> int:
    """Peak RSS of this process's address space (VmHWM). Unlike getrusage's ru_maxrss, which Linux
    carries over fork+exec from the parent (here: the parent's 0.8 GB matrix), it starts afresh."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_child(args) -> int:
    """Run a few queries of one side and print its memory figures as JSON (one line)."""
    s = Setup(args.registry, args.csv, args.rss_queries)
    anon0, file0 = _rss_parts()
    out = {"side": args.rss_child, "rss_start": anon0 + file0, "hwm_reset": reset_hwm()}
    with RssSampler() as sampler:
        if args.rss_child == "ours":
            for qrow in s.query_rows:
                s.reg.search(s.names[int(qrow)], k=K)
                s.reg.search(s.names[int(qrow)], k=K, where=s.where)
        else:
            X = s.load_matrix()
            Xs = X[s.filter_rows()]
            out["matrix_bytes"] = X.nbytes
            for qrow in s.query_rows:
                numpy_topk(X, X[int(qrow)], K, int(qrow))
                numpy_topk(Xs, X[int(qrow)], K, None)
    out.update(peak_rss=vm_hwm(), peak_anon=sampler.peak_anon, peak_file=sampler.peak_file)
    print(json.dumps(out))
    return 0


def measure_rss(root: Path, csv_path: Path, side: str, queries: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--rss-child",
        side,
        "--registry",
        str(root),
        "--csv",
        str(csv_path),
        "--rss-queries",
        str(queries),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child {side} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of models (default 2000)")
    ap.add_argument("--queries", type=int, help="queries per mode (default 200, at most n/10 for small n)")
    ap.add_argument(
        "--queries-unfiltered", type=int, help=f"unfiltered queries (default: --queries, at most {UNFILTERED_DEFAULT})"
    )
    ap.add_argument("--rss-queries", type=int, default=5, help="queries per side in the RSS children (default 5)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache folder (default bench/out)")
    ap.add_argument("--rss-child", choices=["ours", "numpy"], help=argparse.SUPPRESS)
    ap.add_argument("--registry", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    small = max(5, args.n // 10)  # a smoke run (--n 50) takes seconds
    args.queries = args.queries or min(200, small)
    args.queries_unfiltered = args.queries_unfiltered or min(args.queries, UNFILTERED_DEFAULT)

    _, csv_path, _ = ensure_loras(args.n, args.out)
    root = ensure_registry(args.n, args.out)
    s = Setup(root, csv_path, max(args.queries, args.queries_unfiltered))
    warm_page_cache(s.store.shards_on_disk())
    X = s.load_matrix()
    log(f"registry {root}: {s.n} models, D={s.space.dim}; baseline matrix {X.nbytes / 1e6:,.0f} MB in memory")
    s.reg.search(s.names[0], k=K)  # first-call costs (DuckDB, BLAS threads) outside the timings
    s.reg.search(s.names[0], k=K, where=s.where)

    t0 = time.perf_counter()
    unf = run_mode(s, X, filtered=False, n_queries=args.queries_unfiltered)
    log(f"unfiltered: {unf['queries']} queries in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    fil = run_mode(s, X, filtered=True, n_queries=args.queries)
    dt = time.perf_counter() - t0
    log(f"filtered ({s.where}, {fil['rows_scanned']} rows): {fil['queries']} queries in {dt:.1f} s")
    del X
    rss_ours = measure_rss(root, csv_path, "ours", args.rss_queries)
    rss_np = measure_rss(root, csv_path, "numpy", args.rss_queries)

    labels = {
        "ours": "Registry.search (catalog + filter + knn + lookups)",
        "knn": "registry.search.knn (bare engine, same rows)",
        "knn-contig": "knn over all rows, k+1, self dropped (diagnostic)",
        "numpy": "numpy brute force (X in memory)",
    }
    ratios = {}
    for mode in (unf, fil):
        st, base = mode["stats"], mode["stats"]["numpy"]
        rows = [
            [
                labels[sd],
                v["p50_ms"],
                v["p99_ms"],
                v["p50_ms"] / base["p50_ms"],
                v["p99_ms"] / base["p99_ms"],
                f"{mode['agreement'][sd]:.1%}",
            ]
            for sd, v in st.items()
        ]
        title = (
            f"k={K} over {mode['rows_scanned']} rows"
            + (f", filter `{mode['where']}`" if mode["filtered"] else ", no filter")
            + f" ({mode['queries']} queries)"
        )
        print_table(["side", "p50 ms", "p99 ms", "p50/numpy", "p99/numpy", "agree"], rows, title=title)
        for mm in mode["mismatches"]:
            right = ", ".join(mm["exact"]) or "none of them"
            print(
                f"  {mm['query']}: {', '.join(mm['sides'])} differ from numpy; exact float64 distances agree "
                f"with {right} (relative distance gap of the swapped hits {mm['max_rel_gap']:.1e})"
            )
        key = "filtered" if mode["filtered"] else "unfiltered"
        ratios[key] = {
            sd: {"p50": rounded(v["p50_ms"] / base["p50_ms"]), "p99": rounded(v["p99_ms"] / base["p99_ms"])}
            for sd, v in st.items()
        }
        mode["stats"] = {sd: {k: rounded(x) for k, x in v.items()} for sd, v in st.items()}

    mb = 1e6
    print_table(
        ["child process (search phase only)", "RSS at start", "peak RSS", "peak - start", "peak anon", "peak file"],
        [
            [
                f"{r['side']}: {args.rss_queries} unfiltered + {args.rss_queries} filtered queries",
                r["rss_start"] / mb,
                r["peak_rss"] / mb,
                (r["peak_rss"] - r["rss_start"]) / mb,
                r["peak_anon"] / mb,
                r["peak_file"] / mb,
            ]
            for r in (rss_ours, rss_np)
        ],
        title=f"memory, MB (baseline matrix alone: {rss_np['matrix_bytes'] / mb:,.0f} MB; peak = VmHWM)",
    )
    ok = all(ratios[m]["ours"]["p50"] <= 1 for m in ratios)
    verdict = "OK" if ok else "SLOWER THAN THE SCAN"
    print(
        f"\nours/numpy p50: unfiltered {ratios['unfiltered']['ours']['p50']:.2f}, "
        f"filtered {ratios['filtered']['ours']['p50']:.2f} (target <= 1) -> {verdict}"
    )

    emit_result(
        {
            "bench": "search",
            "n": s.n,
            "dim": s.space.dim,
            "k": K,
            "filter": s.where,
            "filter_rows": fil["rows_scanned"],
            "unfiltered": unf,
            "filtered": fil,
            "ratio_over_numpy": ratios,
            "meets_target": ok,
            "rss": {"ours": rss_ours, "numpy": rss_np, "matrix_bytes": rss_np["matrix_bytes"]},
            "env": env_info(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
