"""Attribute directions, edits and model arithmetic on a registry's current subspace.

Directions live in the catalog with the subspace they belong to. Edits move a model by `strength`
standard deviations of an attribute's score and keep the part of the model the subspace does not explain
(w' = w + (dc @ V^T) * std), so editing a real model changes only what the edit asks for. Arithmetic
(`mix`) evaluates a safe expression (w2w.expr) in coefficient space when a subspace exists, or on the raw
vectors (`--in raw`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from registry import wspace
from w2w import directions as dirs
from w2w import expr
from w2w.errors import DirectionError, SpaceMismatchError, UnknownModelError, W2WError

MODES = ("auto", "subspace", "raw", "factors")
# (registry, subspace, attribute) -> the direction, None when there is none: the stored one (load_direction), or
# one a caller may see (the server fits directions over the models a caller may read)
Loader = Callable[..., "dirs.Direction | None"]


def labelled(reg, sm: wspace.SpaceModel, attribute: str) -> tuple[list[int], np.ndarray]:
    """(model ids, labels) of the models of subspace `sm` that have `attribute`, by id: what a fit uses."""
    with reg.catalog.connect() as con:
        known = con.execute("SELECT 1 FROM attribute_keys WHERE key = ?", [attribute]).fetchone()
        rows = con.execute(
            "SELECT a.model_id, a.value FROM attributes a JOIN projections p ON p.model_id = a.model_id "
            "WHERE a.key = ? AND p.subspace_id = ? ORDER BY a.model_id",
            [attribute, sm.id],
        ).fetchall()
    if not known:
        raise DirectionError(f"no attribute {attribute!r} in the registry; `w2wreg ls --json` shows the attributes")
    return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.float64)


def compute_direction(
    reg,
    sm: wspace.SpaceModel,
    attribute: str,
    method: str | None = None,
    debias: Sequence[str] = (),
    keep: Callable[[int], bool] | None = None,
    components: int | None = None,
) -> dirs.Direction:
    """The direction of `attribute` in subspace `sm` (optionally debiased, optionally over the first `components`
    coefficients: w2w.directions.fit_direction), fitted over the labelled models `keep` accepts (all by default),
    without storing it."""

    def fit(name: str, how: str) -> tuple[dirs.Direction, np.ndarray]:
        ids, y = labelled(reg, sm, name)
        if keep is not None:
            kept = [i for i, mid in enumerate(ids) if keep(mid)]
            ids, y = [ids[i] for i in kept], y[kept]
        C = wspace.coefficients(reg, sm, ids)  # (n, k)
        return dirs.fit_direction(C, y, how, name, components), C

    d, C = fit(attribute, method or dirs.DEFAULT_METHOD)
    if debias:
        others = []
        for other in debias:
            if other == attribute:
                raise DirectionError(f"cannot debias {attribute!r} against itself")
            others.append(fit(other, d.method)[0])
        d = dirs.debias(d, others, C)
    return d


def fit_direction(
    reg,
    attribute: str,
    method: str | None = None,
    debias: tuple[str, ...] = (),
    space_id: str | None = None,
    components: int | None = None,
) -> dict:
    """Fit and store the direction of `attribute` in the current subspace (optionally debiased, optionally over
    its first `components` coefficients)."""
    space_id = wspace.pick_space(reg, space_id)
    sm = wspace.require(reg, space_id)
    d = compute_direction(reg, sm, attribute, method, debias, components=components)
    with reg.writing(), reg.catalog.connect(write=True) as con:
        con.execute(
            "INSERT OR REPLACE INTO directions (subspace_id, attribute, method, debiased_against, vector, "
            "score_mean, score_std, n_models) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                sm.id,
                attribute,
                d.method,
                ",".join(d.debiased_against),
                d.vector.tolist(),
                d.score_mean,
                d.score_std,
                d.n_models,
            ],
        )
    return direction_info(d, sm.id)


def direction_info(d: dirs.Direction, subspace_id: str) -> dict:
    return {
        "attribute": d.attribute,
        "method": d.method,
        "subspace": subspace_id,
        "n_models": d.n_models,
        "debiased_against": list(d.debiased_against),
        "components": d.components,
        "score_mean": d.score_mean,
        "score_std": d.score_std,
    }


def load_direction(reg, sm: wspace.SpaceModel, attribute: str) -> dirs.Direction | None:
    """The stored direction of `attribute` in subspace `sm` (None when it was not fitted)."""
    with reg.catalog.connect() as con:
        row = con.execute(
            "SELECT method, vector, score_mean, score_std, n_models, debiased_against FROM directions "
            "WHERE subspace_id = ? AND attribute = ?",
            [sm.id, attribute],
        ).fetchone()
    if row is None:
        return None
    method, vec, mean, std, n, against = row
    return dirs.Direction(
        attribute, method, np.array(vec), mean, std, n, tuple(a for a in (against or "").split(",") if a)
    )


def list_directions(reg, space_id: str | None = None, load: Loader = load_direction) -> list[dict]:
    """The directions of each space's current subspace (as `load` gives them: one it gives None is left out)."""
    out = []
    for space in reg.spaces():
        if space_id and space.id != space_id:
            continue
        sm = wspace.current(reg, space.id)
        if sm is None:
            continue
        with reg.catalog.connect() as con:
            names = [
                r[0]
                for r in con.execute(
                    "SELECT attribute FROM directions WHERE subspace_id = ? ORDER BY attribute", [sm.id]
                ).fetchall()
            ]
        found = ((a, load(reg, sm, a)) for a in names)
        out += [direction_info(d, sm.id) for a, d in found if d is not None]
    return out


def _require_direction(reg, sm: wspace.SpaceModel, attribute: str, load: Loader) -> dirs.Direction:
    d = load(reg, sm, attribute)
    if d is None:
        raise DirectionError(
            f"no direction {attribute!r} in subspace {sm.id}; fit it with `w2wreg direction fit {attribute}`"
        )
    return d


def _score_report(ds: dict[str, dirs.Direction], c_before: np.ndarray, c_after: np.ndarray) -> dict:
    """Each direction's score before and after, in standard deviations from the registry's mean."""
    return {
        a: {
            "before": float((d.scores(c_before) - d.score_mean) / d.score_std),
            "after": float((d.scores(c_after) - d.score_mean) / d.score_std),
        }
        for a, d in ds.items()
    }


def edit_vectors(
    reg, model, strengths: dict[str, float], multiples: Sequence[float] = (1.0,), load: Loader = load_direction
) -> list[np.ndarray]:
    """The vectors (float64) of `model` moved by t * strength standard deviations along each named direction,
    for each t in `multiples` (0: the model itself), without registering them: what `edit` saves at t = 1."""
    if not strengths:
        raise DirectionError("give at least one --direction ATTRIBUTE=STRENGTH")
    m = reg.get(model)
    sm = wspace.require(reg, m.space_id)
    ds = {a: _require_direction(reg, sm, a, load) for a in strengths}
    dc = sum(d.step(strengths[a]) for a, d in ds.items())  # (k,)
    w = reg.vector(m).astype(np.float64)
    step = (sm.sub.components.astype(np.float64) @ dc) * sm.sub.std
    return [w + t * step for t in multiples]  # keeps what the subspace does not explain


def edit(reg, model: str, strengths: dict[str, float], name: str | None = None, load: Loader = load_direction) -> dict:
    """A new model: `model` moved by strength standard deviations along each named direction."""
    m = reg.get(model)
    sm = wspace.require(reg, m.space_id)
    ds = {a: _require_direction(reg, sm, a, load) for a in strengths}
    c = wspace.coefficients(reg, sm, [m.id])[0].astype(np.float64)  # (k,)
    dc = sum(d.step(strengths[a]) for a, d in ds.items())  # (k,)
    (w_new,) = edit_vectors(reg, m, strengths, load=load)
    label = ",".join(f"{a}{s:+g}" for a, s in strengths.items())
    new_name = name or f"{m.name}.{label.replace(',', '.')}"
    params = {"subspace": sm.id, "directions": strengths, "methods": {a: d.method for a, d in ds.items()}}
    (new_id,) = wspace.register_derived(
        reg, m.space_id, [(new_name, w_new.astype(np.float32), "edit", [(m.id, "edit", params)])]
    )
    return {"id": new_id, "name": new_name, "parent": m.name, "subspace": sm.id, "scores": _score_report(ds, c, c + dc)}


_SAFE_NAME = re.compile(r"[^\w.+-]+")


def mix(
    reg, text: str, name: str | None = None, mode: str = "auto", rank: int | None = None, load: Loader = load_direction
) -> dict:
    """A new model from an expression over models and directions, e.g. "alice + 0.8*beard".

    Models of different layouts (ranks, alphas, targets) of one family, mode "factors", or a `rank` mix
    by factor concatenation (mix_factors), exact in dW."""
    if mode not in MODES:
        raise W2WError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    node = expr.parse(text)
    used = expr.names(node)
    models, direction_names = {}, []
    for n in used:
        try:
            models[n] = reg.get(n)
        except UnknownModelError:
            direction_names.append(n)
    if not models:
        raise W2WError(f"{text!r} names no model of the registry (names: {', '.join(used)})")
    spaces = {m.space_id for m in models.values()}
    if len(spaces) > 1 or mode == "factors" or rank is not None:
        return mix_factors(reg, text, node, models, direction_names, name, rank)
    space_id = spaces.pop()
    sm = wspace.current(reg, space_id)
    in_subspace = mode == "subspace" or (mode == "auto" and sm is not None)
    if sm is None and (in_subspace or direction_names):
        raise wspace.NoSubspaceError(space_id)
    ds = {}
    for n in direction_names:
        d = load(reg, sm, n)
        if d is None:
            raise UnknownModelError(n, None)
        ds[n] = d
    if in_subspace:
        C = wspace.coefficients(reg, sm, [m.id for m in models.values()]).astype(np.float64)
        values = {n: C[i] for i, n in enumerate(models)} | {n: d.step(1.0) for n, d in ds.items()}
        c_new = expr.evaluate(node, values.__getitem__)
        w_new = sm.sub.reconstruct(np.asarray(c_new, dtype=np.float32)).astype(np.float64)
        terms = expr.linear_terms(node)
        if terms is not None:
            # as `edit` does, keep what the subspace does not explain: each model's residual, with its
            # weight, so "alice + 1*beard" equals `edit alice --direction beard=1`
            for i, (n, m) in enumerate(models.items()):
                if terms.get(n):
                    w = reg.vector(m).astype(np.float64)
                    w_new += terms[n] * (w - sm.sub.reconstruct(C[i].astype(np.float32)))
    else:
        values = {n: reg.vector(m).astype(np.float64) for n, m in models.items()}
        if ds:
            V = sm.sub.components.astype(np.float64)
            values |= {n: (V @ d.step(1.0)) * sm.sub.std for n, d in ds.items()}
        w_new = expr.evaluate(node, values.__getitem__)
    terms = expr.linear_terms(node)
    params = {
        "expression": text,
        "mode": "subspace" if in_subspace else "raw",
        "subspace": sm.id if sm else None,
        "coefficients": terms,
    }
    lineage = [(m.id, "mix", params | {"weight": (terms or {}).get(n)}) for n, m in models.items()]
    new_name = name or "mix-" + _SAFE_NAME.sub("_", text.replace(" ", ""))[:80]
    (new_id,) = wspace.register_derived(
        reg, space_id, [(new_name, np.asarray(w_new, dtype=np.float32), "mix", lineage)]
    )
    return {
        "id": new_id,
        "name": new_name,
        "mode": params["mode"],
        "parents": list(models),
        "directions": list(ds),
        "coefficients": terms,
    }


def mix_factors(reg, text: str, node, models: dict, direction_names: list[str], name: str | None, rank: int | None):
    """A linear expression over models of one family in any layouts, by factor concatenation: the result's dW is
    the expression's dW exactly (rank per module = sum of the ranks); with `rank`, its best rank-`rank`
    approximation per module (truncated SVD from the factors) and the relative error that costs."""
    from registry.registry import NewModel
    from w2w import factor_mix

    if direction_names:
        raise W2WError(
            f"{text!r}: {direction_names[0]!r} is not a model; a mix across layouts takes models only "
            "(directions live in one space's subspace)"
        )
    terms = expr.linear_terms(node)
    if terms is None:
        raise W2WError(
            f"{text!r}: models of different layouts mix only linearly (a + 0.5*b, lerp); slerp needs one space"
        )
    families = {m.family or "unknown" for m in models.values()}
    if len(families) > 1:
        raise SpaceMismatchError(
            f"{text!r} mixes models of different base-model families ({', '.join(sorted(families))}): "
            "their updates apply to different UNets"
        )
    family = families.pop()
    lora = factor_mix.concat([(terms[n], reg.lora(m)) for n, m in models.items() if terms.get(n)])
    error = None
    if rank is not None:
        lora, error = factor_mix.truncate(lora, rank)
    params = {"expression": text, "mode": "factors", "coefficients": terms, "rank": rank, "rank_error": error}
    lineage = [(m.id, "mix", params | {"weight": terms.get(n)}) for n, m in models.items()]
    new_name = name or "mix-" + _SAFE_NAME.sub("_", text.replace(" ", ""))[:80]
    bases = {m.base_model for m in models.values()}
    item = NewModel.from_lora(
        new_name, lora, base_model=bases.pop() if len(bases) == 1 else None, family=family, kind="mix",
        source="w2wreg mix", lineage=lineage,
    )  # fmt: skip
    report = reg.add_models([item])
    problems = [e for _, e in report.errors] + [r for _, r in report.skipped]
    if problems:
        raise W2WError(problems[0])
    ranks = sorted({l.rank for l in lora.layers.values()})
    return {
        "id": report.added[0][1],
        "name": new_name,
        "mode": "factors",
        "parents": list(models),
        "directions": [],
        "coefficients": terms,
        "ranks": ranks,
        "rank_error": error,
        "near_copies": report.near_copies,
    }
