"""Every model's dW in its family's space: the `deltas` table (exact ||dW||^2 and a fixed-size sketch per
model), a FAISS index of a family's sketches, cross-layout search, and near copies.

A search with a dW metric (`delta`, `delta-cosine`) spans every layout of the query's family: FAISS
proposes candidates from the sketches (w2w.delta.sketch, whose L2 distances estimate the dW Frobenius
distances), restricted to the models matching `--where` by an ID selector, and each candidate is then
compared exactly from its factors (w2w.delta), or taken from the pairs `add` kept (registry.delta_pairs) when the
query is a registered model. Families of at most EXACT_MAX matching models are
compared exactly with every model. Sketches live in the catalog (4 KB per model, written in the
model's own transaction), so they are as atomic as the model rows and need no folder of their own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np

from registry import delta_pairs
from registry import index as coeff_index
from w2w import delta as wdelta
from w2w.flatten import unflatten
from w2w.layout import Layout
from w2w.lora import LoRA

EXACT_MAX = 64  # matching models below which every one is compared exactly (cheaper than a candidate step)
CANDIDATES_MIN, CANDIDATES_FACTOR = 30, 3  # sketch candidates re-ranked exactly: max(MIN, FACTOR * k)
# The re-rank's stop rule (see _rerank_sketched): a candidate is compared exactly unless its sketch distance times a
# floor on (sketch distance / exact distance) exceeds the k-th exact distance found. That ratio is the square
# root of a weighted mean of chi2(32)/32 x chi2(32)/32 terms, one per module and singular direction of the
# difference (plus zero-mean cross terms):
# its spread runs from ~0.2 (a difference in one rank-1 module) to ~0.03 (hub LoRAs, 30+ modules). So the
# floor is taken from the pairs already compared in this query (at least k, all of the family at the query's
# scale): their smallest ratio less RATIO_SIGMAS of their spread, within [STOP_MIN, STOP_MAX]. Selection makes
# the compared ratios low rather than high (small estimates are compared first), so the floor errs low.
STOP_MIN, STOP_MAX, RATIO_SIGMAS = 0.5, 0.9, 4.0
# exact comparisons run on this many threads: numpy's products release the GIL, and each is on one BLAS thread
WORKERS = max(1, min(4, os.cpu_count() or 1))
VIEWS_KEPT = 4096  # models whose layer views are kept between searches (see mapped_lora)
# A near-copy candidate's sketch distance may exceed the true distance: the sketch of a difference
# concentrated in one rank-1 module scales its squared norm by chi2(32)/32 * chi2(32)/32, which exceeds
# 16 (4x in distance) with probability far below 1e-9; spread over modules it is within ~10%.
NEAR_SLACK = 4.0
NEAR_THRESHOLD = 0.01
NEAR_CANDIDATES = 8  # sketch neighbours checked exactly for a near copy (when within NEAR_SLACK)
NEAREST_ROWS = 65536  # stored sketches per product in FamilySketches.nearest_many (64 queries: 16 MB of estimates)
# Relative dW distances of a copy rounded to a smaller float: each factor entry is rounded to within its
# unit roundoff u (2^-11 fp16, 2^-8 bf16), rms u/sqrt(3); B A carries both factors' errors, ~sqrt(2) u/sqrt(3)
# = 0.82 u in rms. Up to 2 u counts as "that dtype's copy"; below 1e-6 it is the same dW (float32 math).
SAME_DW = 1e-6
DTYPE_COPY = (("fp16", 2 * 2.0**-11), ("bf16", 2 * 2.0**-8))


@dataclass
class FamilySketches:
    """A family's committed models: ids, exact squared dW norms, and FAISS indexes of their sketches and of
    their unit-length sketches (for delta-cosine): IndexIDMap over flat L2 indexes, external ids = model ids."""

    family: str
    ids: np.ndarray
    sq_norms: dict[int, float]
    index: faiss.Index
    unit_index: faiss.Index

    @classmethod
    def build(cls, family: str, ids: np.ndarray, sq_norms: np.ndarray, sketches: np.ndarray) -> FamilySketches:
        d = sketches.shape[1] if len(sketches) else wdelta.SKETCH_SIDE**2
        index, unit = faiss.IndexIDMap(faiss.IndexFlatL2(d)), faiss.IndexIDMap(faiss.IndexFlatL2(d))
        if len(ids):
            sk = np.ascontiguousarray(sketches, dtype=np.float32)
            index.add_with_ids(sk, ids.astype(np.int64))
            unit.add_with_ids(_unit(sk), ids.astype(np.int64))
        return cls(family, ids, dict(zip(ids.tolist(), sq_norms.tolist(), strict=True)), index, unit)

    def sketch_of(self, model_id: int) -> np.ndarray:
        row = int(np.searchsorted(self.ids, model_id))  # ids are sorted (read in id order)
        return self.index.index.reconstruct(row)

    def add(self, model_id: int, sq_norm: float, sk: np.ndarray) -> None:
        row, mid = sk[None, :].astype(np.float32), np.array([model_id], dtype=np.int64)
        self.index.add_with_ids(row, mid)
        self.unit_index.add_with_ids(_unit(row), mid)
        self.sq_norms[model_id] = sq_norm

    def nearest_many(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, model ids), each (len(queries), n) and nearest first, of the n sketches nearest
        each query: `index.search` for a batch. The candidates come from one product of the queries with the
        stored sketches (||x||^2 - 2 q.x; FAISS's flat search scans them once per query, ~10x slower for 64
        queries at 65,536 sketches), the distances of the kept ones summed directly (no cancellation)."""
        flat = faiss.downcast_index(self.index.index)
        total, d = flat.ntotal, flat.d
        n = min(n, total)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if n == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        xb = faiss.rev_swig_ptr(flat.get_xb(), total * d).reshape(total, d)  # the index's own storage, no copy
        best = np.empty((len(q), 0), np.int64)
        for lo in range(0, total, NEAREST_ROWS):
            x = xb[lo : lo + NEAREST_ROWS]
            est = np.einsum("ij,ij->i", x, x)[None, :] - 2.0 * (q @ x.T)
            take = min(n, x.shape[0])
            part = np.argpartition(est, take - 1, axis=1)[:, :take] + lo
            best = np.concatenate([best, part], axis=1)
            if best.shape[1] > n:  # this chunk's candidates and the best so far: keep the n nearest, summed directly
                rows = xb[best]  # (q, m, d)
                keep = np.argpartition(np.add.reduce((rows - q[:, None, :]) ** 2, axis=2), n - 1, axis=1)[:, :n]
                best = np.take_along_axis(best, keep, axis=1)
        dist = np.add.reduce((xb[best] - q[:, None, :]) ** 2, axis=2)
        order = np.argsort(dist, axis=1, kind="stable")
        ids = faiss.vector_to_array(self.index.id_map)
        return np.take_along_axis(dist, order, axis=1), ids[np.take_along_axis(best, order, axis=1)]


def _unit(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30), dtype=np.float32)


def record(lora: LoRA | wdelta.Views) -> tuple[float, np.ndarray]:
    """(||dW||^2, sketch) of a LoRA: what the `deltas` table keeps per model."""
    return wdelta.Factors.of(lora).sq_norm, wdelta.sketch(lora)


def read_family(reg, family: str) -> FamilySketches:
    """The family's committed models' sketches, read now (a fresh object: callers may add to it)."""
    with reg.catalog.connect() as con:
        rows = con.execute(
            "SELECT model_id, sq_norm, sketch FROM deltas WHERE family = ? ORDER BY model_id", [family]
        ).fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    sq = np.array([r[1] for r in rows], dtype=np.float64)
    sk = np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows]) if rows else np.zeros((0, 1), np.float32)
    return FamilySketches.build(family, ids, sq, sk)


def load(reg, family: str) -> FamilySketches:
    """The family's sketch index, built once per catalog version (Catalog.cached): never add to it."""
    return reg.catalog.cached(("family-sketches", family), lambda: read_family(reg, family))


FAMILY_METRICS = tuple(wdelta.METRICS)


def mapped_lora(reg, model_id: int) -> wdelta.Views:
    """A registered model's layers as views into its memory-mapped vector row (no copy, no catalog query)."""
    from registry.search import MappedStore

    _, _, sid, row = reg.catalog.model_table().rows[model_id][:4]
    # a search compares a model's views with many queries: kept (views of a kept map: ~30 small objects each)
    lru = reg._cache.get("views") or reg._cache.setdefault("views", OrderedDict())
    hit = lru.get((sid, row))
    if hit is not None:
        lru.move_to_end((sid, row))
        return hit
    space, layout = reg._space_and_layout(sid)
    key = ("mapped", sid)
    vectors = reg._cache.get(key) or reg._cache.setdefault(key, MappedStore(reg.store(space)))
    views = lru[(sid, row)] = wdelta.Views.of(vectors.row(row), layout)
    if len(lru) > VIEWS_KEPT:
        lru.popitem(last=False)
    return views


def factors(reg, model_id: int, sq_norm: float | None = None) -> wdelta.Factors:
    """A registered model's dW factors (float64), read through the kept memory maps."""
    return wdelta.Factors.of(mapped_lora(reg, model_id), sq_norm)


def model_family(reg, model_id: int) -> str:
    return reg.catalog.model_table().model(model_id).family or "unknown"


def _query(
    reg, query, base_model: str | None, drop_text_encoder: bool = False
) -> tuple[str, str, int | None, LoRA | None]:
    """(label, family, model id or None, LoRA of a file or None) of a model reference or a LoRA file/folder."""
    from registry.catalog import ModelRow
    from w2w import family as wfamily

    if not isinstance(query, ModelRow) and isinstance(query, (str, Path)) and Path(query).exists():
        from w2w.formats import discover_one, read_lora

        # what `add` takes, read as `add` reads it: text-encoder modules take part as modules of their own
        rr = read_lora(discover_one(Path(query)), base_model=base_model, drop_text_encoder=drop_text_encoder)
        lora = rr.lora
        return str(query), wfamily.detect(lora.layout(), lora.base_model, lora.meta), None, lora
    table = reg.catalog.model_table()
    model_id = query.id if isinstance(query, ModelRow) else table.find(query)
    if model_id is None:
        reg.get(query)  # raises UnknownModelError with suggestions
    m = table.model(model_id)
    return m.name, m.family or "unknown", m.id, None


def search(reg, query, k: int, where: str | None, metric: str, base_model: str | None, drop_text_encoder: bool = False):
    """(label, family, [(model id, distance)]) of the k models nearest the query's dW in its whole family."""
    label, family, self_id, lora = _query(reg, query, base_model, drop_text_encoder)
    fam = load(reg, family)
    if lora is None:
        lora, q_sq = mapped_lora(reg, self_id), fam.sq_norms[self_id]
    else:
        q_sq = wdelta.Factors.of(lora).sq_norm

    kept = delta_pairs.load(reg).of(self_id) if self_id is not None else {}

    def measure(i: int):
        """The exact distance to model i as a call for a worker thread: the catalog is read here, in the
        caller's thread (a search holds the catalog's lock: see Catalog.pinned), the math there. A pair kept
        at add time (registry.delta_pairs) is the distance itself."""
        o_sq, d2 = fam.sq_norms[i], kept.get(i)
        if d2 is not None:
            return wdelta.metric_from_sq_distance(metric, d2, q_sq, o_sq)
        other = mapped_lora(reg, i)
        return lambda: wdelta.search_distance(metric, lora, other, q_sq, o_sq)

    allowed = fam.ids
    if where and where.strip():
        allowed = np.intersect1d(allowed, reg.catalog.filter_ids_cached(where, None))
    if self_id is not None:
        allowed = allowed[allowed != self_id]
    if len(allowed) <= max(EXACT_MAX, k):
        return label, family, _rerank(allowed, k, measure)
    sk = fam.sketch_of(self_id) if self_id is not None else wdelta.sketch(lora)
    n = max(CANDIDATES_MIN, CANDIDATES_FACTOR * k)
    if metric == "delta-cosine":  # on unit sketches, L2^2 = 2 - 2 cos: nearest in angle
        cand = coeff_index.search(fam.unit_index, _unit(sk[None, :])[0], n, allowed=allowed)
        return label, family, _rerank(cand, k, measure)

    def fetch(n: int) -> tuple[np.ndarray, np.ndarray]:
        cand = coeff_index.search(fam.index, sk, n, allowed=allowed)
        est = np.linalg.norm(np.stack([fam.sketch_of(int(i)) for i in cand]) - sk, axis=1) if len(cand) else []
        return cand, np.asarray(est, dtype=np.float64)

    # a sketch sums float32 products: ~1e-7 |dW| of rounding, so below 1e-4 |dW| its distances are rounding
    resolution = 1e-4 * float(np.sqrt(q_sq))
    return label, family, _rerank_sketched(fetch, n, len(allowed), k, measure, resolution)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="w2w-rerank")


def _run(pool: ThreadPoolExecutor, calls: list) -> list[float]:
    """The values of `calls`: each a float already known (a kept pair) or a call computing it; two or more calls
    go to the pool."""
    todo = [c for c in calls if callable(c)]
    done = iter(pool.map(lambda f: f(), todo) if len(todo) > 1 else [f() for f in todo])
    return [next(done) if callable(c) else c for c in calls]


def _stop_floor(ratios: list[float]) -> float:
    if len(ratios) < 3:
        return STOP_MIN
    r = np.asarray(ratios)
    return float(np.clip(r.min() - RATIO_SIGMAS * r.std(), STOP_MIN, STOP_MAX))


def _rerank(cand: np.ndarray, k: int, measure) -> list[tuple[int, float]]:
    """The k best of `cand` by exact distance, every one compared (`measure(i)`: the distance, or a call that
    computes it)."""
    ids = cand.tolist()
    scored = sorted(zip(_run(_pool(), [measure(i) for i in ids]), ids, strict=True))
    return [(i, d) for d, i in scored[:k]]


def _rerank_sketched(fetch, n: int, total: int, k: int, measure, resolution: float = 0.0) -> list[tuple[int, float]]:
    """The k best by exact distance of the candidates `fetch(n)` proposes (ids, sketch distances ascending).

    The first k are compared, then the next ones in waves of WORKERS while a candidate's estimate times the
    stop floor (see STOP_MIN) does not exceed the k-th exact distance found. When the candidates run out
    before that rule stops (near-ties: many models at almost the k-th distance), 4x more are fetched. Pairs
    closer than `resolution` (the same dW in another factorization) do not count toward the floor: their
    sketch distance is float32 rounding, not the sketch's spread, and one such ratio (~1e6) stopped nothing."""
    best: list[tuple[float, int]] = []
    ratios: list[float] = []
    done: set[int] = set()
    while True:
        cand, est = fetch(n)
        todo = [(i, e) for i, e in zip(cand.tolist(), est.tolist(), strict=True) if i not in done]
        pos = 0
        while pos < len(todo):
            if len(best) >= k:
                limit = best[k - 1][0] / _stop_floor(ratios)
                m = 0
                while m < WORKERS and pos + m < len(todo) and todo[pos + m][1] <= limit:
                    m += 1
                if m == 0:
                    return [(i, d) for d, i in best[:k]]
            else:
                m = k - len(best)
            wave = todo[pos : pos + m]
            for (i, e), d in zip(wave, _run(_pool(), [measure(i) for i, _ in wave]), strict=True):
                best.append((d, i))
                done.add(i)
                if d > resolution:
                    ratios.append(e / d)
            best.sort()
            pos += m
        if len(cand) >= total:
            return [(i, d) for d, i in best[:k]]
        n *= 4


def guess(rel: float, other_ranks: bool = False) -> str:
    """What a near copy at relative dW distance `rel` probably is (`other_ranks`: the two differ in rank)."""
    if rel <= SAME_DW:
        return "same dW: another format or spelling?"
    if other_ranks:
        return "a resize (another rank)?"
    for name, limit in DTYPE_COPY:
        if rel <= limit:
            return f"{name} copy?"
    return "a light fine-tune?"


def ranks(layout: Layout) -> dict[str, int]:
    return {e.module: e.rank for e in layout.entries}


def near(
    fam: FamilySketches,
    q_sq_norm: float,
    sk: np.ndarray,
    threshold: float,
    q_factors,
    load_factors,
    exclude: int | None = None,
    hits: tuple[list[float], list[int]] | None = None,
) -> list[tuple[int, float]]:
    """(model id, relative dW distance) of the family's models within `threshold` of a model q, nearest first.

    q is given by its ||dW||^2 and sketch (`hits`: the family's sketch search for it, when made already); its
    factors (`q_factors()`) are computed only when a sketch neighbour is close enough to be checked exactly, as
    are the neighbour's (`load_factors(id)`)."""
    if hits is None:
        if fam.index.ntotal == 0:
            return []
        dist, ids = fam.index.search(
            np.ascontiguousarray(sk[None, :], dtype=np.float32), min(NEAR_CANDIDATES, fam.index.ntotal)
        )
        hits = dist[0].tolist(), ids[0].tolist()
    out = []
    qn = np.sqrt(q_sq_norm)
    for d2, i in zip(hits[0][:NEAR_CANDIDATES], hits[1][:NEAR_CANDIDATES], strict=True):
        if i < 0 or i == exclude:
            continue
        scale = max(qn, np.sqrt(fam.sq_norms[i]))
        if np.sqrt(max(d2, 0.0)) > NEAR_SLACK * threshold * scale:
            continue
        rel = wdelta.relative_distance(q_factors(), load_factors(i, fam.sq_norms[i]))
        if rel <= threshold:
            out.append((i, rel))
    return sorted(out, key=lambda t: t[1])


def dupes(reg, threshold: float = NEAR_THRESHOLD) -> list[dict]:
    """Groups of near copies (models within `threshold` relative dW distance, transitively), per family."""
    with reg.catalog.connect() as con:
        families = [r[0] for r in con.execute("SELECT DISTINCT family FROM deltas ORDER BY family").fetchall()]
    return [g for family in families for g in _family_dupes(reg, family, threshold)]


def _family_dupes(reg, family: str, threshold: float) -> list[dict]:
    fam = load(reg, family)
    table = reg.catalog.model_table()
    parent = {int(i): int(i) for i in fam.ids}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cache: dict[int, wdelta.Factors] = {}

    def get(i: int, sq_norm: float | None = None) -> wdelta.Factors:
        if i not in cache:
            if len(cache) > 64:  # bound memory: factors are kept only while a few neighbours are compared
                cache.clear()
            cache[i] = factors(reg, i, fam.sq_norms[i])
        return cache[i]

    pairs: dict[tuple[int, int], float] = {}
    sketches = fam.index.index.reconstruct_n(0, fam.index.ntotal) if fam.index.ntotal else None
    for row, i in enumerate(fam.ids.tolist()):
        for j, rel in near(fam, fam.sq_norms[i], sketches[row], threshold, lambda i=i: get(i), get, exclude=i):
            pairs[(min(i, j), max(i, j))] = rel
            parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    groups = []
    for ids in members.values():
        if len(ids) < 2:
            continue
        inside = {(a, b): r for (a, b), r in sorted(pairs.items()) if a in ids}
        groups.append(
            {
                "family": family,
                "models": [{"id": i, "name": table.model(i).name} for i in sorted(ids)],
                "max_relative_distance": max(inside.values()),
                "pairs": [
                    {
                        "a": table.model(a).name,
                        "b": table.model(b).name,
                        "relative_distance": r,
                        "guess": guess(r, _ranks_of(reg, table, a) != _ranks_of(reg, table, b)),
                    }
                    for (a, b), r in inside.items()
                ],
            }
        )
    return groups


def _ranks_of(reg, table, model_id: int) -> dict[str, int]:
    return ranks(reg._space_and_layout(table.model(model_id).space_id)[1])


def backfill(reg) -> int:
    """Compute the `deltas` rows a registry made before them lacks (under the writer lock). Returns how many."""
    from w2w import family as wfamily

    with reg.catalog.connect() as con:
        missing = con.execute(
            "SELECT m.id, m.space_id, m.row_idx, m.base_model FROM models m "
            "LEFT JOIN deltas d ON d.model_id = m.id WHERE d.model_id IS NULL ORDER BY m.id"
        ).fetchall()
    if not missing:
        return 0
    rows = []
    for mid, sid, row, base in missing:
        space = reg.space(sid)
        layout = Layout.from_json(space.layout_json)
        lora = unflatten(reg.store(space).read_one(row), layout, base)
        sq, sk = record(lora)
        rows.append((mid, space.family or wfamily.detect(layout, base), sq, sk.astype("<f4").tobytes()))
    with reg.catalog.connect(write=True) as con:
        con.executemany("INSERT OR IGNORE INTO deltas (model_id, family, sq_norm, sketch) VALUES (?, ?, ?, ?)", rows)
    return len(rows)
