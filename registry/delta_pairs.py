"""Exact dW distances between a model and its sketch-nearest models, computed when the model is added and kept in
the catalog (`delta_pairs`): a dW search from a registered model takes these instead of comparing factors again.

A search's exact re-rank compares the query with the candidates its sketch ranks first (registry.sketches);
for a registered query most of those are models whose sketches are near its own, i.e. the pairs its add (or
their add, when they came later) already compared. Each pair is kept once (a < b) as ||dW_a - dW_b||^2, computed
as a search computes it (w2w.delta.sq_distance: float32 Grams, float64 for near copies), from which both dW
metrics follow given the models' stored ||dW||^2 (w2w.delta.metric_from_sq_distance): exactness is unchanged,
only the work moves from query time to add time (PAIRS_AT_ADD comparisons a model, ~0.3-3 ms each at SD 1.5
ranks 4-64). Model ids are never reused (models are never deleted and a rolled-back add writes no rows), so a
kept pair never goes stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import duckdb
import numpy as np

from registry import index as coeff_index
from registry.catalog import bulk_insert
from w2w import delta as wdelta

PAIRS_AT_ADD = 24  # sketch-nearest models a new model is compared with exactly (a search compares 10-27)


@dataclass
class PairTable:
    """Every kept pair in both directions, sorted by the first id: a model's pairs are one slice."""

    first: np.ndarray
    second: np.ndarray
    sq_distance: np.ndarray

    def of(self, model_id: int) -> dict[int, float]:
        """{other model id: ||dW_model - dW_other||^2} of the pairs kept for `model_id`."""
        lo, hi = np.searchsorted(self.first, [model_id, model_id + 1])
        return dict(zip(self.second[lo:hi].tolist(), self.sq_distance[lo:hi].tolist(), strict=True))


def read(reg) -> PairTable:
    with reg.catalog.connect() as con:
        try:
            cols = con.execute("SELECT a, b, d2 FROM delta_pairs").fetchnumpy()
        except duckdb.CatalogException:  # a registry not written to since before kept pairs: none kept
            return PairTable(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
    a, b, d2 = (np.asarray(cols[c]) for c in ("a", "b", "d2"))
    first, second, both = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([d2, d2])
    order = np.argsort(first, kind="stable")
    return PairTable(first[order], second[order], both[order])


def load(reg) -> PairTable:
    """The kept pairs, read once per catalog version (Catalog.cached)."""
    return reg.catalog.cached(("delta-pairs",), lambda: read(reg))


def compare(
    model_id: int,
    views: wdelta.Views,
    sq_norm: float,
    others: Iterable[int],
    views_of: Callable[[int], wdelta.Views],
    sq_norm_of: Callable[[int], float],
) -> list[tuple[int, int, float]]:
    """(a, b, ||dW_a - dW_b||^2) rows, a < b, of a model against `others`, as a search computes them
    (w2w.delta.sq_distances: the Grams of all side by side). Pairs whose module shapes disagree are left out (a
    family that is not one, `unknown`: a search between them fails too)."""
    agree = [(o, v) for o in others if wdelta.shapes_agree(views, v := views_of(o))]
    if not agree:
        return []
    d2 = wdelta.sq_distances(views, [v for _, v in agree], sq_norm, [sq_norm_of(o) for o, _ in agree])
    return [(min(model_id, o), max(model_id, o), float(d)) for (o, _), d in zip(agree, d2, strict=True)]


def unpaired(reg) -> int:
    """How many models have a dW sketch but no kept pairs computed (added before pairs were kept)."""
    with reg.catalog.connect() as con:
        try:
            return con.execute("SELECT count(*) FROM deltas WHERE paired IS NOT TRUE").fetchone()[0]
        except duckdb.BinderException:  # not written to since before the column: every model
            return con.execute("SELECT count(*) FROM deltas").fetchone()[0]


def backfill(reg, progress: Callable[[Iterable], Iterable] = lambda x: x) -> int:
    """Compute the kept pairs of models registered before they were kept (`deltas.paired` false), each
    against its sketch-nearest models registered before it, as its add would have. Returns how many models."""
    from registry import sketches

    with reg.catalog.connect(write=True):  # adds the column to a registry made before it (Catalog.connect)
        pass
    with reg.catalog.connect() as con:
        todo = con.execute(
            "SELECT model_id, family FROM deltas WHERE paired IS NOT TRUE ORDER BY family, model_id"
        ).fetchall()
    if not todo:
        return 0
    rows: list[tuple[int, int, float]] = []

    def views_of(i: int) -> wdelta.Views:
        return sketches.mapped_lora(reg, i)

    for mid, family in progress(todo):
        fam = sketches.load(reg, family)
        earlier = fam.ids[fam.ids < mid]
        if len(earlier):
            with coeff_index.single_thread():
                near = coeff_index.search(fam.index, fam.sketch_of(mid), PAIRS_AT_ADD, allowed=earlier)
            views = sketches.mapped_lora(reg, mid)
            with wdelta.one_blas_thread():
                rows += compare(mid, views, fam.sq_norms[mid], near.tolist(), views_of, fam.sq_norms.__getitem__)
    with reg.catalog.connect(write=True) as con:
        con.execute("BEGIN TRANSACTION")
        bulk_insert(con, "delta_pairs", rows, ["BIGINT", "BIGINT", "DOUBLE"], or_ignore=True)
        con.execute("UPDATE deltas SET paired = true WHERE paired IS NOT TRUE")
        con.execute("COMMIT")
    return len(todo)
