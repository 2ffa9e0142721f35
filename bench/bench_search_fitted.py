"""Search after a fit (k = 10): Registry.search vs exact=True, the bare HNSW and flat coefficient searches.

    python bench/bench_search_fitted.py [--n 65000] [--components 1000] [--queries 200] [--out bench/out]
    python bench/bench_search_fitted.py --n 2000          # small: a few minutes
    python bench/bench_search_fitted.py --n 65000 --delete # and remove the 26 GB registry afterwards

Data: N planted low-rank models at the w2w layout (D = 99,648): vector = mean + U (sigma * z) + noise, with
ingest.synthetic.Population's mean (shared A init), per-parameter scales (A moves little, B carries the
identity) and basis U, a latent of --latent dimensions (default 1,000) with a decaying spectrum
sigma_j = j^-decay (default 0.5), and noise --noise. Attributes: `group` (0..9 uniform, independent of the
latent: `"group" = 0` selects ~10%; GROUP is an SQL keyword, hence the quotes), `age`, `smile`. The models
go in through Registry.add_models (one transaction, as `w2wreg add` does), then wspace.fit_space fits
k = --components (on every model, or on the first --fit-on with a `--where id <= ...` fit; every model is
projected and indexed either way).
The registry is kept under <out>/fitted-<n>-... and reused when complete; --delete removes it at the end.

Per query (models of the registry chosen at random, by name: each is excluded from its own results),
side by side in rotating order:
  * ours           Registry.search(name, k=10): the post-fit path (the query's index coordinates from the
                   index, candidates from its neighbour list, or from the index with a filter, exact re-rank
                   on the full vectors); unfiltered and `--where "group" = 0`;
  * ours, index only  the same with the candidates from the index (the two-stage graph), as for a query
                   that is a file or a model added since the lists were made; `--rescore F,...` adds it
                   with other rescoring factors (registry.index.RESCORE_FACTOR);
  * hnsw / flat    the bare coefficient searches for k=10 (no re-rank, no catalog), in the index's
                   coordinates: FAISS HNSW (the registry's index, or one built here when N < HNSW_MIN; a
                   filter is an ID selector) and FAISS flat (knn_L2sqr over all the index's rows, or over
                   the filter's rows: what the library does for a filter of up to FLAT_FILTER_MAX models);
  * exact          Registry.search(name, k=10, exact=True) scans every full vector: ~1 min per query at
                   N = 65,000 from disk, so the reference for every query comes from one pass over the store
                   (`reference`), checked against exact=True on a few queries (--check-exact);
recall@10 of each against the reference, and the candidate sweep: recall@10 after the exact re-rank of the
top-m candidates for several m (HNSW and flat), from which the library's candidate count is chosen.
Warm vs cold: "warm" times a query whose vectors are in the page cache (the query is run once before,
untimed); "cold" evicts the vector store's pages (posix_fadvise DONTNEED, after dropping the search's
memory maps) before each query, so the full-vector re-rank reads from disk; measured in each of
registry.search.PREFETCH's modes (MADV_WILLNEED on the candidate rows). The index stays in memory in both
(a serving process holds it: ~0.3 GB at N = 65,000, k = 1,000).
Cached vs uncached: the search keeps the model table, the row table and a filter's ids until the catalog
changes; the first search after a change pays for them, measured separately ("uncached").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, emit_result, env_info, log, pct, print_table, rounded  # noqa: E402

K = 10
SEED = 0
BASE = "runwayml/stable-diffusion-v1-5"
BATCH = 256
WHERE = '"group" = 0'  # quoted: GROUP is an SQL keyword
SWEEP = (10, 12, 15, 20, 30, 50, 100, 200)


# --- the planted population ----------------------------------------------------------------------


class Planted:
    """Batches of planted models: mean + U (sigma * z) + noise, deterministic per batch."""

    def __init__(self, latent: int, decay: float, noise: float, seed: int = SEED):
        from ingest.synthetic import Population
        from w2w.presets import sd15_layout

        self.layout = sd15_layout("w2w")
        pop = Population(self.layout, latent=latent, seed=seed, noise=noise)
        sigma = np.arange(1, latent + 1, dtype=np.float64) ** -decay
        self.mean = pop.mean
        self.basis_t = np.ascontiguousarray((pop.basis * sigma.astype(np.float32)).T)  # (latent, D)
        self.latent, self.noise, self.seed = latent, noise, seed

    def batch(self, lo: int, hi: int) -> tuple[np.ndarray, list[dict]]:
        rng = np.random.default_rng((self.seed, lo))
        Z = rng.standard_normal((hi - lo, self.latent), dtype=np.float32)  # (b, latent)
        W = Z @ self.basis_t  # (b, D)
        W += self.mean
        W += self.noise * rng.standard_normal(W.shape, dtype=np.float32)
        groups = rng.integers(0, 10, hi - lo)
        attrs = [
            {"group": float(g), "age": float(np.round(35 + 10 * z[0], 1)), "smile": bool(z[1] > 0)}
            for g, z in zip(groups, Z, strict=True)
        ]
        return W, attrs


def registry_path(args) -> Path:
    fit = f"-fit{args.fit_on}" if args.fit_on else ""
    return args.out / f"fitted-{args.n}-L{args.latent}-d{args.decay:g}-k{args.components}{fit}"


def ensure_registry(args) -> tuple[Path, dict]:
    """Build (or reuse) the registry: add N planted models, then fit. Returns (root, build figures).

    Each step leaves a marker (.bench-added with its time, then .bench-complete), so a build cut short
    after the add (one transaction: all or nothing) resumes with the fit; `--build-only` runs just this.
    """
    from registry import wspace
    from registry.registry import NewModel, Registry

    root = registry_path(args)
    marker, added = root / ".bench-complete", root / ".bench-added"
    if marker.exists():
        reg = Registry.open(root)
        sm = wspace.current(reg, reg.spaces()[0].id)
        from registry import index as coeff_index

        index = coeff_index.load(sm.index_path)
        lists = coeff_index.load_lists(coeff_index.lists_path(sm.index_path), index, sm.coords_digest)
        if args.reindex or not sm.ordered or lists is None:  # an index made by an older library
            t0 = time.perf_counter()
            wspace.reindex(reg, sm, say=log)
            log(f"index rebuilt in {time.perf_counter() - t0:.0f} s")
        return root, json.loads(marker.read_text())
    if not added.exists():
        if root.exists():
            shutil.rmtree(root)
        log(f"building {root}: {args.n} planted models, D = 99,648 ({args.n * 99648 * 4 / 1e9:.1f} GB of vectors)")
        t0 = time.perf_counter()
        gen = Planted(args.latent, args.decay, args.noise)
        reg = Registry.init(root)

        def models():
            for lo in range(0, args.n, BATCH):
                hi = min(lo + BATCH, args.n)
                W, attrs = gen.batch(lo, hi)
                for j in range(hi - lo):
                    yield NewModel(f"p{lo + j:06d}", W[j], gen.layout, BASE, attributes=attrs[j])
                if (hi // BATCH) % 40 == 0:
                    log(f"  {hi} models generated and staged")

        report = reg.add_models(models())
        assert report.committed and len(report.added) == args.n, report.to_json()["errors"][:3]
        added.write_text(json.dumps({"add_seconds": round(time.perf_counter() - t0, 1)}) + "\n")
        log(f"added {args.n} models: {added.read_text().strip()}")
    reg = Registry.open(root)
    assert reg.spaces()[0].n_models == args.n, f"{root} holds {reg.spaces()[0].n_models} models; delete it"
    log(f"fitting k = {args.components}" + (f" on the first {args.fit_on} models" if args.fit_on else ""))
    t1 = time.perf_counter()
    where = f"id <= {args.fit_on}" if args.fit_on else None
    info = wspace.fit_space(reg, components=args.components, where=where, say=log)
    build = json.loads(added.read_text()) | {
        "fit_seconds": info["fit_seconds"], "fit_project_index_seconds": round(time.perf_counter() - t1, 1),
        "fitted_on": info["n_models"], "explained": info["explained_variance_ratio"], "error_p95": info["error_p95"],
    }  # fmt: skip
    log(f"fit: {json.dumps(build)}")
    marker.write_text(json.dumps(build) + "\n")
    return root, build


# --- the reference: exact top-k of every query, in one pass over the store -----------------------------


def reference(s: Setup) -> dict[str, list[np.ndarray]]:
    """Exact top-K model ids of every query (unfiltered and filtered), as Registry.search(exact=True) finds them.

    exact=True scans all N full vectors per query (26 GB at N = 65,000: ~1 min each from disk here), so the
    bench computes the same answer for all queries in one pass: float32 distances block by block (BLAS),
    the best K + 40 per query kept, then those recomputed in float64 (registry.search._direct) and ordered
    by (distance, row) as knn orders them. `check_reference` compares it with exact=True on a few queries.
    Cached next to the registry (reference-<queries>.npz).
    """
    from registry.search import _direct

    path = s.root / f"reference-{len(s.query_names)}-{SEED}.npz"
    if path.exists():
        z = np.load(path)
        return {"all": list(z["all"]), "filtered": list(z["filtered"])}
    log(f"reference: exact top-{K} of {len(s.query_names)} queries in one pass over the store")
    t0 = time.perf_counter()
    Q = s.store.read(s.query_rows)  # (q, D)
    qn = np.einsum("ij,ij->i", Q, Q, dtype=np.float64)
    keep = K + 40
    best = {w: [np.empty((len(Q), 0)), np.empty((len(Q), 0), np.int64)] for w in ("all", "filtered")}
    block = 512
    for lo in range(0, s.n, block):
        rows = s.rows[lo : lo + block]
        X = s.store.read(rows)  # (b, D)
        d2 = s.sq[lo : lo + block][None, :] + qn[:, None] - 2.0 * (Q @ X.T).astype(np.float64)  # (q, b)
        d2[s.query_rows[:, None] == rows[None, :]] = np.inf  # a query is not its own neighbour
        for w in best:
            dw = d2 if w == "all" else np.where(s.allowed_mask[lo : lo + block][None, :], d2, np.inf)
            D_, I_ = np.hstack([best[w][0], dw]), np.hstack([best[w][1], np.broadcast_to(rows, dw.shape)])
            top = np.argsort(D_, axis=1, kind="stable")[:, :keep]
            best[w] = [np.take_along_axis(D_, top, 1), np.take_along_axis(I_, top, 1)]
        if lo // block % 16 == 0:
            log(f"  reference: {lo + len(rows)} / {s.n} rows ({time.perf_counter() - t0:.0f} s)")
    out = {}
    for w, (D_, I_) in best.items():
        out[w] = []
        for i in range(len(Q)):
            cand = I_[i][np.isfinite(D_[i])]
            d = _direct(s.store.read(cand), Q[i], "l2", None)
            order = np.lexsort((cand, d))[:K]
            out[w].append(s.ids[np.searchsorted(s.rows, cand[order])])
    np.savez(path, all=np.array(out["all"]), filtered=np.array(out["filtered"]))
    log(f"reference done in {time.perf_counter() - t0:.0f} s")
    return out


def check_reference(s: Setup, ref: dict, n_all: int, n_filtered: int) -> dict:
    """Registry.search(exact=True) on a few queries against the one-pass reference: same ids, same order."""
    same, t = {"all": [], "filtered": []}, {"all": [], "filtered": []}
    for w, n in (("all", n_all), ("filtered", n_filtered)):
        for i in range(n):
            t0 = time.perf_counter()
            hits = s.reg.search(s.query_names[i], k=K, where=WHERE if w == "filtered" else None, exact=True).hits
            t[w].append(time.perf_counter() - t0)
            same[w].append([h.model.id for h in hits] == ref[w][i].tolist())
    return {w: {"checked": len(same[w]), "identical": int(sum(same[w])),
                "exact_seconds_p50": rounded(pct(t[w], 50)) if t[w] else None} for w in same}  # fmt: skip


# --- setup ---------------------------------------------------------------------------------------------


class Setup:
    """The registry, its subspace and index, the query set: all outside any timing."""

    def __init__(self, root: Path, n_queries: int):
        from registry import index as coeff_index
        from registry import wspace
        from registry.registry import Registry

        self.root = root
        self.reg = Registry.open(root)
        (self.space,) = self.reg.spaces()
        self.store = self.reg.store(self.space)
        self.sm = wspace.current(self.reg, self.space.id)
        self.index = coeff_index.load(self.sm.index_path)
        self.index_kind = coeff_index.kind_of(self.index)
        with self.reg.catalog.connect() as con:
            cols = con.execute(
                "SELECT id, name, row_idx, sq_norm FROM models WHERE space_id = ? ORDER BY row_idx", [self.space.id]
            ).fetchnumpy()
        self.ids, self.rows = np.asarray(cols["id"], np.int64), np.asarray(cols["row_idx"], np.int64)
        self.names, self.sq = list(cols["name"]), np.asarray(cols["sq_norm"], np.float64)
        self.n = len(self.ids)
        assert np.array_equal(self.rows, np.arange(self.n)), "row_idx is not 0..N-1"
        self.allowed = np.asarray(self.reg.catalog.filter_ids(WHERE, self.space.id), dtype=np.int64)
        self.allowed_mask = np.isin(self.ids, self.allowed)
        # the index's own vectors (the coefficients in index coordinates) and the model id of each
        self.Y, self.Y_ids = coeff_index.stored(self.index), coeff_index.ids_of(self.index)
        self.allowed_Y_rows = np.flatnonzero(np.isin(self.Y_ids, self.allowed))
        rng = np.random.default_rng(SEED)
        self.query_rows = np.sort(rng.choice(self.n, size=min(n_queries, self.n), replace=False))
        self.query_names = [self.names[r] for r in self.query_rows]
        self.query_ids = self.ids[self.query_rows]
        self.query_y = np.stack([coeff_index.reconstruct(self.index, i) for i in self.query_ids])  # (q, k)
        self.hnsw = self.index if self.index_kind == "hnsw" else None


def evict(s: Setup) -> None:
    """Drop the vector store from the page cache: the search's maps first (mapped pages stay cached)."""
    from registry.search import MappedStore

    for v in s.reg._cache.values():
        if isinstance(v, MappedStore):
            v.close()
    for p in s.store.shards_on_disk():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the sides -------------------------------------------------------------------------------------------


def bare_hnsw(s: Setup, i: int, n: int, allowed: bool, ef: int | None = None) -> np.ndarray:
    """HNSW over the index coordinates (filter: an ID selector), as the registry's index answers."""
    from registry import index as coeff_index

    sel = s.hnsw_sel if allowed else None
    got = coeff_index.search(s.hnsw, s.query_y[i], n + 1, s.allowed if allowed else None, ef=ef, sel=sel)
    return got[got != s.query_ids[i]][:n]


def bare_flat(s: Setup, i: int, n: int, allowed: bool) -> np.ndarray:
    """Exact top n in index coordinates: FAISS knn_L2sqr over all the index's rows, or over the filter's."""
    import faiss
    from faiss import swig_ptr

    from registry import index as coeff_index

    q = np.ascontiguousarray(s.query_y[i])
    if allowed:
        found, _ = coeff_index.search_rows(s.Y, q, n + 1, s.allowed_Y_rows)
    else:
        dist, found = np.empty(n + 1, np.float32), np.empty(n + 1, np.int64)
        faiss.knn_L2sqr(swig_ptr(q), swig_ptr(s.Y), s.Y.shape[1], 1, len(s.Y), n + 1, swig_ptr(dist), swig_ptr(found))
    got = s.Y_ids[found]
    return got[got != s.query_ids[i]][:n]


def recall(found, truth) -> float:
    return len(set(np.asarray(found).tolist()) & set(np.asarray(truth).tolist())) / len(truth)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args) -> None:
    from registry import index as coeff_index
    from registry import registry as registry_mod

    root, build = ensure_registry(args)
    load0 = os.getloadavg()
    s = Setup(root, args.queries)
    own_hnsw = s.hnsw is None
    if own_hnsw:  # small N: the registry holds a flat index; build an HNSW one here for the bare side
        log("building an HNSW index over the index coordinates for the bare HNSW side (the registry's is flat)")
        s.hnsw = coeff_index.build(s.Y, s.Y_ids, kind="hnsw", ordered=s.sm.ordered)
    s.hnsw_sel = coeff_index.selector(s.hnsw, s.allowed)
    log(f"N = {s.n}, filter {WHERE!r}: {len(s.allowed)} models ({len(s.allowed) / s.n:.1%}); index {s.index_kind}")
    ref = reference(s)
    nq = len(s.query_names)
    m_lib = max(registry_mod.L2_CANDIDATES_MIN, registry_mod.L2_CANDIDATES_FACTOR * K)

    # candidate sweep: recall@10 after the exact re-rank of m candidates = |truth & candidates| / 10
    sweep = [m for m in args.sweep if m <= s.n]
    rec = {(side, w, m): [] for side in ("hnsw", "flat") for w in ("all", "filtered") for m in sweep}
    with coeff_index.single_thread():
        for i in range(nq):
            for w in ("all", "filtered"):
                truth = ref[w][i]
                flat = bare_flat(s, i, max(sweep), w == "filtered")
                for m in sweep:
                    rec[("flat", w, m)].append(recall(flat[:m], truth))
                    rec[("hnsw", w, m)].append(recall(bare_hnsw(s, i, m, w == "filtered"), truth))
    rows = []
    for m in sweep:
        cells = [m]
        for side in ("hnsw", "flat"):
            for w in ("all", "filtered"):
                r = np.array(rec[(side, w, m)])
                cells += [f"{r.mean():.4f} ({int((r < 1).sum())})"]
        rows.append(cells)
    print_table(
        ["m", "hnsw all", "hnsw filter", "flat all", "flat filter"],
        rows,
        f"recall@10 after the exact re-rank of m coefficient candidates (mean over {nq} queries; in brackets, "
        f"queries with recall < 1); HNSW efSearch = max({coeff_index.EF_MIN}, {coeff_index.EF_FACTOR} m); "
        f"library default m = {m_lib}",
    )

    if args.sweep_only:
        return

    # timed sides, warm: each query once untimed (page cache, maps), then timed, in rotating order
    from registry import search as search_mod

    def with_setting(module, name, value, side):
        """side, run with module.name = value (restored after each call)."""

        def call(i):
            before = getattr(module, name)
            setattr(module, name, value)
            try:
                return side(i)
            finally:
                setattr(module, name, before)

        return call

    def with_prefetch(mode, side):
        return with_setting(search_mod, "PREFETCH", mode, side)

    sides = {
        "ours": lambda i: s.reg.search(s.query_names[i], k=K),
        "ours+filter": lambda i: s.reg.search(s.query_names[i], k=K, where=WHERE),
        "ours prefetch=True": with_prefetch(True, lambda i: s.reg.search(s.query_names[i], k=K)),
        "hnsw": lambda i: bare_hnsw(s, i, K, False),
        "hnsw+filter": lambda i: bare_hnsw(s, i, K, True),
        "flat": lambda i: bare_flat(s, i, K, False),
        "flat+filter": lambda i: bare_flat(s, i, K, True),
    }

    for factor in args.rescore if coeff_index.two_stage(s.index) else []:
        sides[f"ours rescore {factor}"] = with_setting(coeff_index, "RESCORE_FACTOR", factor, sides["ours"])
    from registry import wspace

    # candidates from the graph, as for a file or a new model
    sides["ours, index only"] = with_setting(wspace, "USE_LISTS", False, sides["ours"])
    names = list(sides)
    times = {n: [] for n in names}
    recs = {n: [] for n in names}
    for i in range(nq):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            w = "filtered" if "filter" in name else "all"
            if name.startswith("ours"):
                sides[name](i)  # warm
                dt, res = timed(lambda name=name, i=i: sides[name](i))
                got = [h.model.id for h in res.hits]
            else:
                with coeff_index.single_thread():
                    dt, got = timed(lambda name=name, i=i: sides[name](i))
            times[name].append(dt)
            recs[name].append(recall(got, ref[w][i]))

    # cold: the vector store evicted from the page cache before each query; registry.search.PREFETCH in each
    # of its modes ("auto", the default: prefetch the rest once a row comes from disk)
    cold_sides = {
        "ours": sides["ours"],
        "ours+filter": sides["ours+filter"],
        "ours prefetch=True": sides["ours prefetch=True"],
        "ours prefetch=False": with_prefetch(False, sides["ours"]),
    }
    cold_names = list(cold_sides)
    cold = {n: [] for n in cold_names}
    cold_rec = {n: [] for n in cold_names}
    n_cold = min(args.cold_queries, nq)
    for i in range(n_cold):
        for j in range(len(cold_names)):
            name = cold_names[(i + j) % len(cold_names)]
            evict(s)
            dt, res = timed(lambda name=name, i=i: cold_sides[name](i))
            cold[name].append(dt)
            truth = ref["filtered" if "filter" in name else "all"][i]
            cold_rec[name].append(recall([h.model.id for h in res.hits], truth))

    # uncached: the first search after the catalog changed (model table, row table, filter ids read again),
    # its vectors in the page cache (the query is run once before)
    unc = {"ours": [], "ours+filter": []}
    for i in range(min(5, nq)):
        for name in unc:
            sides[name](i)
            s.reg.catalog._shared.slots.clear()
            dt, _ = timed(lambda name=name, i=i: sides[name](i))
            unc[name].append(dt)

    checks = check_reference(s, ref, args.check_exact, args.check_exact_filtered)
    load1 = os.getloadavg()

    def row(name, ts, rs, note=""):
        return [name, pct(ts, 50) * 1e3, pct(ts, 95) * 1e3, float(np.mean(rs)), int(sum(r < 1 for r in rs)), note]

    table = [row(n, times[n], recs[n], "warm") for n in names]
    table += [row(n + " cold", cold[n], cold_rec[n], f"{n_cold} queries, store evicted") for n in cold]
    table += [[n + " uncached", pct(unc[n], 50) * 1e3, max(unc[n]) * 1e3, None, None, "first search after a commit"]
              for n in unc]  # fmt: skip
    print_table(
        ["side", "p50 ms", "p95 ms", "recall@10", "queries < 1", "note"],
        table,
        f"k = {K} search after a fit: N = {s.n}, D = {s.space.dim}, k = {s.sm.sub.k} components, "
        f"{nq} queries, filter {WHERE} ({len(s.allowed)} models)",
    )
    ours, flat = pct(times["ours"], 50), pct(times["flat"], 50)
    print(f"\nours vs bare flat coefficient search: {flat / ours:.1f}x faster (p50), with the exact re-rank")
    print(f"ours vs bare HNSW: {ours / pct(times['hnsw'], 50):.1f}x the time (the re-rank of {m_lib} full vectors)")
    print(f"targets: p50 < 1 ms with recall@10 = 1.0 -> {ours * 1e3:.3f} ms, recall {np.mean(recs['ours']):.4f}; "
          f"with the 10% filter < 5 ms -> {pct(times['ours+filter'], 50) * 1e3:.3f} ms, "
          f"recall {np.mean(recs['ours+filter']):.4f}")  # fmt: skip
    print(f"exact=True against the one-pass reference: {json.dumps(checks)}")
    print(f"load average: {load0[0]:.1f} at the start, {load1[0]:.1f} at the end (2 cores, shared)")
    emit_result({
        "bench": "search_fitted", "n": s.n, "dim": s.space.dim, "components": s.sm.sub.k, "queries": nq,
        "latent": args.latent, "decay": args.decay, "noise": args.noise, "index": s.index_kind,
        "hnsw_built_here": own_hnsw, "filter": WHERE, "filter_models": len(s.allowed), "candidates": m_lib,
        "build": build, "reference_check": checks, "loadavg": [load0[0], load1[0]],
        "sides": {n: {"p50_ms": rounded(pct(times[n], 50) * 1e3), "p95_ms": rounded(pct(times[n], 95) * 1e3),
                      "recall": float(np.mean(recs[n]))} for n in names},
        "cold": {n: {"p50_ms": rounded(pct(cold[n], 50) * 1e3), "p95_ms": rounded(pct(cold[n], 95) * 1e3),
                     "recall": float(np.mean(cold_rec[n])) if cold_rec[n] else None} for n in cold if cold[n]},
        "uncached_ms": {n: [rounded(t * 1e3) for t in unc[n]] for n in unc},
        "sweep": {f"{side}/{w}/{m}": float(np.mean(v)) for (side, w, m), v in rec.items()},
        "env": env_info(),
    })  # fmt: skip
    if args.delete:
        s.reg.catalog.close()
        shutil.rmtree(root)
        log(f"deleted {root}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65000)
    ap.add_argument("--components", type=int, default=1000)
    ap.add_argument("--latent", type=int, default=1000)
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=0.002)
    ap.add_argument("--fit-on", type=int, default=0, help="fit on the first FIT_ON models (0: all), project all")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cold-queries", type=int, default=40)
    ap.add_argument("--check-exact", type=int, default=2, help="queries also run through exact=True, unfiltered")
    ap.add_argument("--check-exact-filtered", type=int, default=5)
    ap.add_argument("--sweep", type=lambda v: [int(x) for x in v.split(",")], default=list(SWEEP))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the candidate sweep")
    ap.add_argument("--delete", action="store_true", help="delete the registry afterwards")
    ap.add_argument("--reindex", action="store_true", help="rebuild the coefficient index first (index changes)")
    ap.add_argument(
        "--rescore", type=lambda v: [int(x) for x in v.split(",")], default=[],
        help="also time `ours` with these two-stage rescoring factors (registry.index.RESCORE_FACTOR)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.build_only:
        ensure_registry(args)
        return
    run(args)


if __name__ == "__main__":
    main()
