"""The registry's own API under /api/w2w/: search by weights, models with lineage and neighbours, the
space (projection, a 2-D map, sampling, edits, arithmetic). Described by the app's OpenAPI document.

Reads are open unless the server is --private; anything that registers a model needs the bearer token.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from registry import edits, wspace
from registry.catalog import ModelRow
from registry.search import METRICS
from server import indexing
from server.hf_api import check_readable, require_writer
from server.state import ServerState

Metric = Literal[METRICS]  # type: ignore[valid-type]
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
    repo: str | None = Field(None, description="The repo of this hub the model was pushed to, if it was.")

    @classmethod
    def of(cls, m: ModelRow) -> ModelOut:
        repo = None
        if m.source and m.source.startswith(indexing.SOURCE_PREFIX):
            repo = m.source[len(indexing.SOURCE_PREFIX) :].split("@")[0]
        return cls(
            id=m.id,
            name=m.name,
            kind=m.kind,
            space_id=m.space_id,
            base_model=m.base_model,
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


ERRORS = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 404: {"model": ErrorOut}}


def default_space(reg, given: str | None) -> str:
    """The space named, else the largest one with a fitted subspace (else the largest): a team hub has
    one base model and, often, a few strays; the page and the API default to the big one."""
    if given:
        return wspace.pick_space(reg, given)
    spaces = sorted(reg.spaces(), key=lambda s: -s.n_models)
    if not spaces:
        return wspace.pick_space(reg, None)  # its error says there is nothing yet
    fitted = [s for s in spaces if wspace.current(reg, s.id) is not None]
    return (fitted or spaces)[0].id


def build_router(state: ServerState) -> APIRouter:
    def readable(request: Request) -> None:
        check_readable(state, request)

    def writer(request: Request) -> str:
        return require_writer(state, request)

    r = APIRouter(prefix="/api/w2w", tags=["w2w"], responses=ERRORS, dependencies=[Depends(readable)])
    reg = state.registry

    def hits(result) -> list[HitOut]:
        return [HitOut(model=ModelOut.of(h.model), distance=h.distance) for h in result.hits]

    @r.get("/models", response_model=ModelList, summary="List models, filtered by attributes")
    def list_models(
        where: Annotated[str | None, Query(max_length=2000, examples=["beard AND NOT glasses"])] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ):
        with state.lock:
            models = reg.ls(where or None)
        return ModelList(total=len(models), models=[ModelOut.of(m) for m in models[offset : offset + limit]])

    @r.get("/models/{ref}", response_model=ModelDetail, summary="A model with its lineage and nearest neighbours")
    def model(ref: str, k: Annotated[int, Query(ge=0, le=100)] = 5):
        with state.lock:
            m = reg.get(ref)
            lineage = [LineageOut(**row) for row in reg.catalog.lineage(m.id)]
            children = [ModelOut.of(c) for c in reg.catalog.models_by_ids(reg.catalog.children(m.id))]
            proj = wspace.projection_info(reg, m.id)
            near = hits(reg.search(m, k=k)) if k else []
        return ModelDetail(
            model=ModelOut.of(m),
            lineage=lineage,
            children=children,
            projection=ProjectionOut(**proj) if proj else None,
            neighbours=near,
        )

    @r.get(
        "/models/{ref}/lora",
        summary="The model as a diffusers LoRA file (safetensors)",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def lora_file(ref: str):
        from safetensors.numpy import save

        from w2w.formats import diffusers as dfmt

        with state.lock:
            m = reg.get(ref)
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
    ):
        with state.lock:
            m = reg.get(like)  # a model of the registry, never a path on the server's disk
            result = reg.search(m, k=k, where=where or None, metric=metric)
        return SearchOut(query=m.name, space=result.space_id, metric=result.metric, hits=hits(result))

    @r.get("/models/{ref}/project", response_model=ProjectOut, summary="A model's coefficients in the w2w space")
    def project(ref: str, n: Annotated[int, Query(ge=1, le=10_000)] = 50):
        with state.lock:
            m = reg.get(ref)
            sm = wspace.require(reg, m.space_id)
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
    def spaces():
        out = []
        with state.lock:
            for s in reg.spaces():
                sm = wspace.current(reg, s.id)
                out.append(
                    SpaceOut(
                        id=s.id,
                        base_model=s.base_model,
                        dim=s.dim,
                        models=s.n_models,
                        subspace=sm.id if sm else None,
                        components=sm.sub.k if sm else None,
                    )
                )
        return out

    @r.get("/map", response_model=MapOut, summary="Every model at its first two subspace coefficients")
    def space_map(space: Annotated[str | None, Query(max_length=200)] = None):
        with state.lock:
            spaces = reg.spaces()
            if not spaces:
                return MapOut(space=None, subspace=None, explained=[], points=[])
            sid = default_space(reg, space)
            sm = wspace.current(reg, sid)
            if sm is None:
                return MapOut(space=sid, subspace=None, explained=[], points=[])
            models = reg.catalog.list_models(space_id=sid)
            C = wspace.coefficients(reg, sm, [m.id for m in models]) if models else np.zeros((0, 2))
        C = np.pad(C[:, :2], ((0, 0), (0, max(0, 2 - C.shape[1]))))
        ev = [float(x) for x in np.asarray(sm.sub.explained_variance_ratio)[:2]]
        pts = [
            Point(id=m.id, name=m.name, kind=m.kind, x=float(c[0]), y=float(c[1]))
            for m, c in zip(models, C, strict=True)
        ]
        return MapOut(space=sid, subspace=sm.id, explained=ev, points=pts)

    @r.get("/directions", response_model=list[DirectionOut], summary="Fitted attribute directions")
    def directions():
        with state.lock:
            rows = edits.list_directions(reg)
        return [
            DirectionOut(
                attribute=d["attribute"], subspace=d["subspace"], method=d["method"], score_std=d.get("score_std")
            )
            for d in rows
        ]

    def created(names: list[str], details: dict) -> Created:
        return Created(models=[ModelOut.of(reg.get(n)) for n in names], details=details)

    @r.post("/sample", response_model=Created, summary="New models sampled from the space (needs a token)")
    def sample(body: SampleIn, user: str = Depends(writer)):
        with state.lock:
            made = wspace.sample(
                reg,
                n=body.n,
                seed=body.seed,
                temperature=body.temperature,
                prefix=body.prefix,
                space_id=default_space(reg, body.space),
            )
            return created([m["name"] for m in made], {"by": user})

    @r.post("/edit", response_model=Created, summary="A model moved along attribute directions (needs a token)")
    def edit(body: EditIn, user: str = Depends(writer)):
        with state.lock:
            out = edits.edit(reg, body.model, dict(body.directions), body.name)
            return created([out["name"]], {"scores": out["scores"], "by": user})

    @r.post("/mix", response_model=Created, summary="A model from an expression over models (needs a token)")
    def mix(body: MixIn, user: str = Depends(writer)):
        with state.lock:
            out = edits.mix(reg, body.expr, body.name, body.mode)
            return created([out["name"]], {"mode": out["mode"], "parents": out["parents"], "by": user})

    return r
