"""The ASGI app of `w2wreg serve`: the Hub protocol (server.hf_api), the w2w API (server.w2w_api), the page."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from registry.registry import Registry
from server import hf_api, indexing, preview_api, safe_serving, w2w_api
from server.accounts import Accounts
from server.previews import Limits, Previews, Renderer
from server.request_id import RequestId
from server.state import DEFAULT_MAX_UPLOAD, ServerState
from w2w.errors import RegistryLockedError, W2WError

log = logging.getLogger("w2wreg.serve")


def create_app(
    registry: Registry | str | Path,
    tokens: Accounts | dict[str, str],
    private: bool = False,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    index_branches: bool = False,
    lfs: bool = False,
    renderer: Renderer | None = None,
    render_limits: Limits | None = None,
) -> FastAPI:
    """The server over one registry. `tokens`: the accounts (server.accounts), or {token: user name} for
    users without organizations. `renderer` draws the page's previews (ingest.preview.Previewer; None: none
    are drawn), within `render_limits`."""
    reg = registry if isinstance(registry, Registry) else Registry.open(registry)
    state = ServerState(
        reg, Accounts.of(tokens), private=private, max_upload=max_upload, index_branches=index_branches, lfs=lfs
    )
    with state.lock:
        for repo_id, result in indexing.catch_up(reg, state.store):
            log.info("indexed %s at start: %s", repo_id, result.to_json())

    app = FastAPI(
        title="w2wreg",
        version="1",
        summary="A weight-space registry of LoRAs: search by weights, the w2w space, derived models.",
        description="The registry's API. The same server speaks the Hugging Face Hub protocol for model repos "
        "(point huggingface_hub at it with HF_ENDPOINT) and indexes every LoRA pushed to it.",
        docs_url="/api/w2w/docs",
        redoc_url=None,
        openapi_url="/api/w2w/openapi.json",
    )
    app.state.w2w = state
    app.add_middleware(safe_serving.SecurityHeaders, exempt=("/api/w2w/docs",))
    app.add_middleware(RequestId)

    @app.exception_handler(hf_api.HubHTTPError)
    async def hub_error(request: Request, e: hf_api.HubHTTPError):
        return hf_api.error_response(e)

    @app.exception_handler(W2WError)
    async def w2w_error(request: Request, e: W2WError):
        status = (
            404
            if isinstance(e, LookupError)  # UnknownModelError, a missing repo or revision
            else 403
            if isinstance(e, PermissionError)  # server.subspace_view.SubspaceHidden
            else 503
            if isinstance(e, RegistryLockedError)
            else 400
        )
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, e: RecursionError):
        # the parsers' bounds (registry.nesting) should stop this first; never a 500 for nested input
        return JSONResponse({"error": "the request is nested too deeply"}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse(
            {"error": f"{where}: {first.get('msg', 'invalid request')}", "detail": jsonable_encoder(e.errors())},
            status_code=422,
        )

    page = resources.files("server").joinpath("assets/index.html").read_text()
    page_headers = {
        "Content-Security-Policy": safe_serving.page_policy(page),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        # the page is the same for everyone: what it shows comes from the API, under the caller's token
        return HTMLResponse(page, headers=page_headers)

    app.include_router(w2w_api.build_router(state))
    app.state.previews = Previews(renderer, render_limits or Limits())
    app.include_router(preview_api.build_router(state, app.state.previews))
    app.include_router(hf_api.build_router(state))  # last: its /{ns}/{name}/resolve/... route is the widest
    return app
