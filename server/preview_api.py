"""Previews under /api/w2w/models/{ref}/preview: what the page may draw of a model, and the image itself.

A model is found through server.access.ModelView like every other route (a model the caller may not read
is missing, and so is its image); the weights are read under the registry's lock, the image is drawn
outside it (server.previews bounds and queues the work).
"""

# no `from __future__ import annotations`: the routes' bounds (Query(le=limits.max_steps)) are the server's
# settings, evaluated where the routes are made, which FastAPI cannot do from string annotations
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from registry import edits, wspace
from server import access
from server.accounts import Identity
from server.directions_view import DirectionView
from server.previews import DEFAULT_PROMPT, Previews, check_size, image_key, parse_edit
from server.state import ServerState
from server.subspace_view import require_usable, usable
from w2w.errors import W2WError
from w2w.flatten import unflatten


class DirectionSlider(BaseModel):
    attribute: str
    score: float | None  # the model's score now, in standard deviations from the registry's mean
    score_std: float | None


class PreviewInfo(BaseModel):
    model: str
    available: bool
    reason: str | None = None
    base: str | None = None
    size: int | None = None
    max_size: int | None = None
    steps: int
    max_steps: int
    max_strength: float
    prompt: str
    subspace: str | None = None
    directions: list[DirectionSlider]


PNG = {200: {"content": {"image/png": {}}}, 503: {"description": "the renderer is busy; retry"}}


def build_router(state: ServerState, previews: Previews) -> APIRouter:
    limits = previews.limits
    reg = state.registry

    def viewer(request: Request) -> Identity:
        who = access.identity(state, request)
        access.require_server_read(state, who)
        return who

    r = APIRouter(prefix="/api/w2w", tags=["previews"])

    def busy(e: Exception) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})

    def sliders(m, v: access.ModelView) -> tuple[str | None, list[DirectionSlider]]:
        sm = wspace.current(reg, m.space_id)
        if sm is None or not usable(v, sm):  # no sliders through a subspace of models the caller may not read
            return None, []
        c = wspace.coefficients(reg, sm, [m.id])[0].astype(np.float64)  # (k,)
        out = []
        load = DirectionView(v).load  # fitted over the models the caller may read
        for row in edits.list_directions(reg, m.space_id, load=load):
            d = load(reg, sm, row["attribute"])
            score = float((d.scores(c) - d.score_mean) / d.score_std) if d.score_std else None
            out.append(DirectionSlider(attribute=d.attribute, score=score, score_std=d.score_std))
        return sm.id, out

    @r.get("/models/{ref}/preview", response_model=PreviewInfo, summary="What this server can draw of a model")
    def preview_info(ref: str, who: Identity = Depends(viewer)):
        with state.lock:
            v = access.ModelView(state, who)
            m = v.get(ref)
            lora = reg.lora(m)
            subspace, directions = sliders(m, v)
        info = {
            "model": m.name,
            "steps": limits.default_steps,
            "max_steps": limits.max_steps,
            "max_strength": limits.max_strength,
            "prompt": DEFAULT_PROMPT,
            "subspace": subspace,
            "directions": directions,
        }
        try:
            base = previews.base(m, lora)
        except TimeoutError as e:  # the base is loading
            return busy(e)
        except W2WError as e:
            return PreviewInfo(available=False, reason=str(e), **info)
        return PreviewInfo(
            available=True, base=base.ref, size=base.resolution, max_size=limits.size_limit(base), **info
        )

    @r.get(
        "/models/{ref}/preview.png",
        summary="One image of a model, or of an edit of it, on its base model",
        response_class=Response,
        responses=PNG,
    )
    def preview_png(
        request: Request,
        ref: str,
        edit: Annotated[
            str | None,
            Query(max_length=2000, description="ATTRIBUTE=STRENGTH,... in standard deviations", examples=["smile=1.5"]),
        ] = None,
        seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
        steps: Annotated[int, Query(ge=1, le=limits.max_steps)] = limits.default_steps,
        size: Annotated[int | None, Query(ge=8, le=4096, description="pixels a side; default the base's")] = None,
        prompt: Annotated[str, Query(min_length=1, max_length=limits.max_prompt)] = DEFAULT_PROMPT,
        who: Identity = Depends(viewer),
    ):
        strengths = parse_edit(edit, limits.max_strength)
        with state.lock:
            v = access.ModelView(state, who)
            m = v.get(ref)
            if strengths:  # an unknown or unfitted direction: DirectionError, a 400 naming it
                require_usable(v, wspace.current(reg, m.space_id), "an edit along attribute directions")
                (w,) = edits.edit_vectors(reg, m, strengths, load=DirectionView(v).load)
            else:
                w = reg.vector(m)
            lora = unflatten(np.asarray(w, dtype=np.float32), reg.layout(m.space_id), m.base_model)
        weights = np.asarray(w, dtype=np.float32).tobytes()
        try:
            base = previews.base(m, lora)  # one it cannot draw: a 400 saying why
            size = check_size(size, base, limits)
            key = image_key(base, weights, prompt, seed, steps, size)
            etag = f'"{key[:32]}"'
            headers = {"ETag": etag, "Cache-Control": "private, no-cache"}  # private: never in a shared cache
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers=headers)
            data = previews.draw(m, lora, key, prompt, seed, steps, size)
        except TimeoutError as e:  # the renderer's queue is full, or the base is loading
            return busy(e)
        return Response(data, media_type="image/png", headers=headers)

    return r
