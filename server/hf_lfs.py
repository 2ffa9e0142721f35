"""Large files through the Git LFS batch API, as the Hub's client uses it (basic transfer).

preupload answers "lfs" for what the Hub sends through LFS (server.hf_commit.upload_mode); the client
then asks `/{repo}.git/info/lfs/objects/batch` (a writer of the repo only) and gets, for each object not
stored yet, an upload link: a URL signed for that repo, object and size, valid for an hour, since the
client PUTs to it without its token. The PUT is streamed to disk while hashed (server memory does not grow
with the file) and the object is kept only when its size and sha256 are the ones announced. The commit
then names the object in an `lfsFile` line. Downloads go through `resolve` as for any file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from registry.hubs.store import RepoNotFound
from server import access, body_stream
from server.errors import HubHTTPError, repo_not_found
from server.hf_common import json_object, repo_id_of
from server.state import ServerState
from w2w.errors import HubError

LFS_JSON = "application/vnd.git-lfs+json"
LINK_TTL = 3600  # seconds an upload link stays valid
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sign(secret: bytes, repo_id: str, oid: str, size: int, expires: int) -> str:
    return hmac.new(secret, f"{repo_id}\n{oid}\n{size}\n{expires}".encode(), hashlib.sha256).hexdigest()


def _lfs(body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=LFS_JSON)


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    secret = secrets.token_bytes(32)  # per process: links of a server that restarted are refused (the client retries)

    @r.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def batch(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        who = access.identity(state, request)
        body = await json_object(request, "{operation, objects: [{oid, size}], transfers, hash_algo}")
        if body.get("operation") != "upload":
            access.require_repo_read(state, who, repo_id)
            raise HubHTTPError(400, "this hub takes LFS uploads only: download files through /resolve/")
        access.require_repo_write(state, who, request, repo_id)
        if not state.store.exists(repo_id):
            raise repo_not_found(repo_id)
        if body.get("hash_algo", "sha256") != "sha256":
            raise HubHTTPError(409, "only hash_algo sha256 is supported")
        if "basic" not in (body.get("transfers") or ["basic"]):
            raise HubHTTPError(409, "only the basic transfer is supported")
        objects = body.get("objects")
        if not isinstance(objects, list) or len(objects) > 10_000:
            raise HubHTTPError(400, "objects must be a list of {oid, size} (at most 10,000)")
        base = str(request.base_url).rstrip("/")
        expires = int(time.time()) + LINK_TTL
        out = []
        for o in objects:
            oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                why = {"code": 422, "message": "oid must be a sha256 and size a byte count"}
                out.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": why})
                continue
            if size > state.max_upload:
                why = {"code": 413, "message": f"{size} bytes is over this hub's limit of {state.max_upload}"}
                out.append({"oid": oid, "size": size, "error": why})
                continue
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not state.store.repo_has_lfs(repo_id, oid, size):  # uploaded already: the client skips it
                sig = _sign(secret, repo_id, oid, size, expires)
                href = f"{base}/api/lfs-upload/{quote(repo_id)}/{oid}?size={size}&expires={expires}&sig={sig}"
                entry["actions"] = {
                    "upload": {"href": href, "expires_in": LINK_TTL},
                    "verify": {"href": f"{base}/{quote(repo_id)}.git/info/lfs/objects/verify"},
                }
            out.append(entry)
        return _lfs({"transfer": "basic", "objects": out, "hash_algo": "sha256"})

    @r.put("/api/lfs-upload/{ns}/{name}/{oid}")
    async def upload(ns: str, name: str, oid: str, request: Request):
        repo_id = repo_id_of(ns, name)
        q = request.query_params
        try:
            size, expires, sig = int(q.get("size", "")), int(q.get("expires", "")), q.get("sig", "")
        except ValueError:
            raise HubHTTPError(401, "this upload link is not valid: ask the batch API for another") from None
        good = _sign(secret, repo_id, oid, size, expires)
        if not hmac.compare_digest(good, sig) or expires < time.time():
            raise HubHTTPError(401, "this upload link is not valid or has expired: ask the batch API for another")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) != size:
            raise HubHTTPError(400, f"the upload has {declared} bytes, not the {size} announced")
        try:
            # limit size + 1: a longer body reaches put_stream, which says so
            await body_stream.in_thread(request, lambda batches: state.store.put_stream(batches, oid, size), size + 1)
            state.store.mark_lfs(repo_id, oid)
        except RepoNotFound:
            raise repo_not_found(repo_id) from None
        except HubError as e:
            raise HubHTTPError(400, str(e)) from None
        return {}

    @r.post("/{ns}/{name}.git/info/lfs/objects/verify")
    async def verify(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_write(state, access.identity(state, request), request, repo_id)
        body = await json_object(request, "{oid, size}")
        oid, size = body.get("oid"), body.get("size")
        if not (isinstance(oid, str) and _SHA256.fullmatch(oid) and isinstance(size, int)):
            raise HubHTTPError(400, "the body must be {oid: sha256, size: bytes}")
        if not state.store.repo_has_lfs(repo_id, oid, size):
            raise HubHTTPError(404, f"the LFS object {oid} ({size} bytes) was not uploaded")
        return _lfs({})

    return r
