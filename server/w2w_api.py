"""The registry's own API under /api/w2w/: search by weights, models with lineage and neighbours, the
space (projection, a 2-D map, sampling, edits, arithmetic). Described by the app's OpenAPI document.

Reads are open unless the server is --private; anything that registers a model needs a token. Every
route sees the registry through server.access.ModelView: a model the caller may not read is not a
result, a neighbour, a lineage parent, a child, a point of the map or part of a count, and naming it
answers as for a model that does not exist.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from registry import edits, wspace
from registry.catalog import ModelRow
from registry.search import METRICS
from registry.sketches import FAMILY_METRICS
from server import access
from server.accounts import Identity
from server.directions_view import DirectionView
from server.state import ServerState
from server.subspace_view import require_usable, usable
from server.where_guard import check_where
from w2w import expr
from w2w.errors import FilterError, UnknownModelError, W2WError

Metric = Literal[tuple(dict.fromkeys((*METRICS, wspace.W2W_METRIC, *FAMILY_METRICS)))]  # type: ignore[valid-type]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ModelOut(BaseModel):
    id: int
    name: str
    kind: str
    space_id: str
    base_model: str | None
    source: str | None
    created: str | None
    attributes: dict[str, float | bool]
    family: str | None = Field(None, description="The base-model family (sd15, sd2, sdxl, toy, unknown).")
    repo: str | None = Field(None, description="The repo of this hub the model was pushed to, if it was.")

    @classmethod
    def of(cls, m: ModelRow) -> ModelOut:
        repo = access.repo_of_source(m.source)
        return cls(
            id=m.id,
            name=m.name,
            kind=m.kind,
            space_id=m.space_id,
            base_model=m.base_model,
            family=m.family,
            source=m.source,
            created=str(m.created) if m.created is not None else None,
            attributes=m.attributes,
            repo=repo,
        )


class ModelList(BaseModel):
    total: int
    models: list[ModelOut]


class HitOut(BaseModel):
    model: ModelOut
    distance: float


class SearchOut(BaseModel):
    query: str
    space: str
    metric: str
    hits: list[HitOut]


class LineageOut(BaseModel):
    parent_id: int | None
    parent: str | None
    operation: str
    params: dict | None


class ProjectionOut(BaseModel):
    subspace: str
    relative_error: float
    fitted_p95: float
    well_explained: bool


class ModelDetail(BaseModel):
    model: ModelOut
    lineage: list[LineageOut]
    children: list[ModelOut]
    projection: ProjectionOut | None
    neighbours: list[HitOut]
    neighbours_metric: str = Field(description="w2w where the caller may use the space's subspace, else l2")


class ProjectOut(BaseModel):
    model: str
    subspace: str
    k: int
    coefficients: list[float]
    relative_error: float | None
    well_explained: bool | None


class Point(BaseModel):
    id: int
    name: str
    kind: str
    x: float
    y: float


class MapOut(BaseModel):
    space: str | None
    subspace: str | None
    explained: list[float] = Field(description="Fraction of variance of the two plotted components.")
    points: list[Point]


class SpaceOut(BaseModel):
    id: str
    base_model: str | None
    dim: int
    models: int
    subspace: str | None
    components: int | None


class DirectionOut(BaseModel):
    attribute: str
    subspace: str
    method: str
    score_std: float | None = None


class SampleIn(BaseModel):
    n: int = Field(1, ge=1, le=64)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    temperature: Finite = Field(1.0, ge=0, le=10)
    prefix: str = Field("sample", min_length=1, max_length=100)
    space: str | None = None


class EditIn(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    directions: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=200)


class MixIn(BaseModel):
    expr: str = Field(min_length=1, max_length=2000, examples=["lerp(alice, bob, 0.3) + 0.5*beard"])
    name: str | None = Field(None, min_length=1, max_length=200)
    mode: Literal["auto", "raw", "subspace"] = "auto"


class Created(BaseModel):
    models: list[ModelOut]
    details: dict


class ErrorOut(BaseModel):
    error: str


ERRORS = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}}


def default_space(reg, given: str | None, counts: dict[str, int]) -> str:
    """The space named, else the one with the most models the caller sees, preferring one with a fitted
    subspace: a team hub has one base model and, often, a few strays. `counts`: visible models per space;
    a space without any is as unknown as a missing one."""
    if given:
        if not counts.get(given):
            raise W2WError(f"no space {given!r}; spaces: {', '.join(sorted(counts)) or 'none'}")
        return given
    if not counts:
        raise W2WError("the registry holds no models yet; add some with `w2wreg add`")
    ranked = sorted(counts, key=lambda sid: (-counts[sid], sid))
    fitted = [sid for sid in ranked if wspace.current(reg, sid) is not None]
    return (fitted or ranked)[0]


PARENT_KEYS = ("parent", "parent_repo", "parent_revision")


def build_router(state: ServerState) -> APIRouter:
    def viewer(request: Request) -> Identity:
        who = access.identity(state, request)
        access.require_server_read(state, who)
        return who

    def writer(request: Request, who: Identity = Depends(viewer)) -> Identity:
        access.require_user(who, request)
        return who

    r = APIRouter(prefix="/api/w2w", tags=["w2w"], responses=ERRORS, dependencies=[Depends(viewer)])
    reg = state.registry

    def safe_where(where: str | None) -> str | None:
        return check_where(where, reg.catalog.attribute_keys())  # callers hold state.lock

    @contextmanager
    def running(where: str | None):
        """Run a caller's filter. DuckDB's errors quote row values ("could not convert string 'x'"), which may be
        a model the caller may not read: only the kind of error is said."""
        try:
            yield
        except FilterError as e:
            kind = str(e).split(" failed: ", 1)[-1].split(":", 1)[0].strip()[:40]
            raise FilterError(
                f"where {where!r} cannot be evaluated ({kind}): compare number attributes with numbers and text "
                "columns with 'text'"
            ) from None

    def view(who: Identity) -> access.ModelView:
        return access.ModelView(state, who)  # callers hold state.lock

    def visible_counts(v: access.ModelView) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in v.only(reg.ls()):
            counts[m.space_id] = counts.get(m.space_id, 0) + 1
        return counts

    def nearest(v: access.ModelView, query: ModelRow, k: int, where: str | None = None, metric: str = "l2"):
        """(result, hits): the k nearest models the caller may read. Asks for k more than the hidden models
        so that, whatever is left out, k remain when there are k. By the w2w metric only for a caller who may
        use the space's subspace: its ranking comes from coordinates its basis gives, as private as the basis."""
        if metric == wspace.W2W_METRIC:
            require_usable(v, wspace.current(reg, query.space_id), "a search by the w2w metric")
        result = reg.search(query, k=k + len(v.hidden), where=where, metric=metric)
        shown = [h for h in result.hits if v.can_read(h.model.id)][:k]
        return result, [HitOut(model=ModelOut.of(h.model), distance=h.distance) for h in shown]

    @r.get("/models", response_model=ModelList, summary="List models, filtered by attributes")
    def list_models(
        where: Annotated[str | None, Query(max_length=2000, examples=["beard AND NOT glasses"])] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
        who: Identity = Depends(viewer),
    ):
        with state.lock:
            where = safe_where(where)
            with running(where):
                models = view(who).only(reg.ls(where))
        return ModelList(total=len(models), models=[ModelOut.of(m) for m in models[offset : offset + limit]])

    @r.get("/models/{ref}", response_model=ModelDetail, summary="A model with its lineage and nearest neighbours")
    def model(ref: str, k: Annotated[int, Query(ge=0, le=100)] = 5, who: Identity = Depends(viewer)):
        with state.lock:
            v = view(who)
            m = v.get(ref)
            lineage = [lineage_out(v, row) for row in reg.catalog.lineage(m.id)]
            children = [ModelOut.of(c) for c in v.only(reg.catalog.models_by_ids(reg.catalog.children(m.id)))]
            # (its error is measured against the fitted models': left out where those are not all readable)
            sm = wspace.current(reg, m.space_id)
            may_use = usable(v, sm)  # (True without a subspace: nothing to hide)
            proj = wspace.projection_info(reg, m.id) if may_use else None
            # who is alike: by the w2w metric where there is a subspace the caller may use (by l2 on the raw
            # vectors one low-norm model is nearly everyone's nearest: README, "Search")
            metric = wspace.W2W_METRIC if sm is not None and may_use else "l2"
            near = nearest(v, m, k, metric=metric)[1] if k else []
        return ModelDetail(
            model=ModelOut.of(m),
            lineage=lineage,
            children=children,
            projection=ProjectionOut(**proj) if proj else None,
            neighbours=near,
            neighbours_metric=metric,
        )

    def lineage_out(v: access.ModelView, row: dict) -> LineageOut:
        if row["parent_id"] is None or v.can_read(row["parent_id"]):
            return LineageOut(**row)
        # a parent the caller may not read: the step is shown, not whom it was taken from
        params = {k: x for k, x in (row["params"] or {}).items() if k not in PARENT_KEYS} if row["params"] else None
        return LineageOut(parent_id=None, parent=None, operation=row["operation"], params=params)

    @r.get(
        "/models/{ref}/lora",
        summary="The model as a diffusers LoRA file (safetensors)",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def lora_file(ref: str, who: Identity = Depends(viewer)):
        from safetensors.numpy import save

        from w2w.formats import diffusers as dfmt

        with state.lock:
            m = view(who).get(ref)
            tensors, metadata = dfmt.to_tensors(reg.lora(m))
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata=metadata)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{dfmt.WEIGHT_NAME}"'},
        )

    @r.get("/search", response_model=SearchOut, summary="Nearest models by weights")
    def search(
        like: Annotated[str, Query(min_length=1, max_length=200, description="A model's name or id.")],
        k: Annotated[int, Query(ge=1, le=1000)] = 10,
        where: Annotated[str | None, Query(max_length=2000)] = None,
        metric: Metric = "l2",
        who: Identity = Depends(viewer),
    ):
        with state.lock:
            v = view(who)
            m = v.get(like)  # a model of the registry, never a path on the server's disk
            where = safe_where(where)
            with running(where):
                result, found = nearest(v, m, k, where, metric)
        return SearchOut(query=m.name, space=result.space_id, metric=result.metric, hits=found)

    @r.get("/models/{ref}/project", response_model=ProjectOut, summary="A model's coefficients in the w2w space")
    def project(ref: str, n: Annotated[int, Query(ge=1, le=10_000)] = 50, who: Identity = Depends(viewer)):
        with state.lock:
            v = view(who)
            m = v.get(ref)
            sm = wspace.require(reg, m.space_id)
            require_usable(v, sm, "a model's coefficients")
            c = wspace.coefficients(reg, sm, [m.id])[0]
            info = wspace.projection_info(reg, m.id) or {}
        return ProjectOut(
            model=m.name,
            subspace=sm.id,
            k=sm.sub.k,
            coefficients=[float(x) for x in c[:n]],
            relative_error=info.get("relative_error"),
            well_explained=info.get("well_explained"),
        )

    @r.get("/spaces", response_model=list[SpaceOut], summary="Weight spaces and their current subspaces")
    def spaces(who: Identity = Depends(viewer)):
        out = []
        with state.lock:
            counts = visible_counts(view(who))
            for s in reg.spaces():
                if not counts.get(s.id):
                    continue  # only hidden models: the space itself would tell of them
                sm = wspace.current(reg, s.id)
                out.append(
                    SpaceOut(
                        id=s.id,
                        base_model=s.base_model,
                        dim=s.dim,
                        models=counts[s.id],
                        subspace=sm.id if sm else None,
                        components=sm.sub.k if sm else None,
                    )
                )
        return out

    @r.get("/map", response_model=MapOut, summary="Every model at its first two subspace coefficients")
    def space_map(space: Annotated[str | None, Query(max_length=200)] = None, who: Identity = Depends(viewer)):
        with state.lock:
            v = view(who)
            counts = visible_counts(v)
            if not counts and not space:
                return MapOut(space=None, subspace=None, explained=[], points=[])
            sid = default_space(reg, space, counts)
            sm = wspace.current(reg, sid)
            if sm is None:
                return MapOut(space=sid, subspace=None, explained=[], points=[])
            require_usable(v, sm, "the map")
            models = v.only(reg.catalog.list_models(space_id=sid))
            C = wspace.coefficients(reg, sm, [m.id for m in models]) if models else np.zeros((0, 2))
        C = np.pad(C[:, :2], ((0, 0), (0, max(0, 2 - C.shape[1]))))
        ev = [float(x) for x in np.asarray(sm.sub.explained_variance_ratio)[:2]]
        pts = [
            Point(id=m.id, name=m.name, kind=m.kind, x=float(c[0]), y=float(c[1]))
            for m, c in zip(models, C, strict=True)
        ]
        return MapOut(space=sid, subspace=sm.id, explained=ev, points=pts)

    @r.get("/directions", response_model=list[DirectionOut], summary="Fitted attribute directions")
    def directions(who: Identity = Depends(viewer)):
        with state.lock:  # fitted over the models the caller may read (server.directions_view)
            rows = edits.list_directions(reg, load=DirectionView(view(who)).load)
        return [
            DirectionOut(
                attribute=d["attribute"], subspace=d["subspace"], method=d["method"], score_std=d.get("score_std")
            )
            for d in rows
        ]

    def created(names: list[str], details: dict) -> Created:
        return Created(models=[ModelOut.of(reg.get(n)) for n in names], details=details)

    @r.post("/sample", response_model=Created, summary="New models sampled from the space (needs a token)")
    def sample(body: SampleIn, who: Identity = Depends(writer)):
        with state.lock:
            v = view(who)
            space_id = default_space(reg, body.space, visible_counts(v))
            require_usable(v, wspace.current(reg, space_id), "sampling")  # its Gaussians are the fitted models'
            with v.redacting():
                made = wspace.sample(
                    reg, n=body.n, seed=body.seed, temperature=body.temperature, prefix=body.prefix, space_id=space_id
                )
            return created([m["name"] for m in made], {"by": who.name})

    @r.post("/edit", response_model=Created, summary="A model moved along attribute directions (needs a token)")
    def edit(body: EditIn, who: Identity = Depends(writer)):
        with state.lock:
            v = view(who)
            m = v.get(body.model)  # an edit of a model the caller may not read would show its weights
            require_usable(v, wspace.current(reg, m.space_id), "an edit along attribute directions")
            with v.redacting():
                out = edits.edit(reg, m.name, dict(body.directions), body.name, load=DirectionView(v).load)
            return created([out["name"]], {"scores": out["scores"], "by": who.name})

    @r.post("/mix", response_model=Created, summary="A model from an expression over models (needs a token)")
    def mix(body: MixIn, who: Identity = Depends(writer)):
        with state.lock:
            v = view(who)
            spaces, others = set(), []
            for name in expr.names(expr.parse(body.expr)):
                try:
                    m = reg.get(name)
                except UnknownModelError:
                    others.append(name)  # a direction, or unknown: mix says which
                    continue
                if not v.can_read(m.id):
                    raise UnknownModelError(name, None)  # what mix says of a name that is neither
                spaces.add(m.space_id)
            mode = body.mode
            if len(spaces) == 1 and not usable(v, sm := wspace.current(reg, next(iter(spaces)))):
                # directions live in the subspace (an unknown name is left to mix: a 404, as for a hidden model)
                if mode == "subspace" or any(edits.load_direction(reg, sm, n) is not None for n in others):
                    require_usable(v, sm, "a mix in the subspace or with attribute directions")
                if mode == "auto":  # as in a space not fitted yet
                    mode = "raw"
            with v.redacting():
                out = edits.mix(reg, body.expr, body.name, mode, load=DirectionView(v).load)
            return created([out["name"]], {"mode": out["mode"], "parents": out["parents"], "by": who.name})

    return r
