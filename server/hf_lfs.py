"""Large files through the Git LFS batch API, as the Hub's client uses it: basic and multipart uploads,
and downloads.

preupload answers "lfs" (with `w2wreg serve --lfs`) for what the Hub sends through LFS
(server.hf_commit.upload_mode); a client without Xet (HF_HUB_DISABLE_XET=1) then asks
`/{repo}.git/info/lfs/objects/batch` (a writer of the repo only) and gets, for each object the repo does not
hold yet, links signed for that repo, object and size, valid for an hour (the client PUTs to them without
its token):
- basic (an object of at most `lfs_part_size` bytes, or a client that offers no "multipart"): one PUT,
  streamed to disk while hashed (RepoStore.put_stream);
- multipart (the Hub's own transfer, for bigger objects): `header` has `chunk_size` and one link per part;
  each part PUT is written in place (registry.hubs.staging.PartedFile) and answered with an ETag; the
  client then POSTs {oid, parts: [{partNumber, etag}]} to the upload href, and the object is kept only when
  all parts are there and it has the announced sha256 and size.
Server memory does not grow with the object either way. The commit then names the object in an `lfsFile`
line. Downloads: `resolve` serves any file; the batch API's "download" operation (git-lfs clients) gives
a signed link per object the repo holds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from registry.hubs.staging import PartedFile
from registry.hubs.store import RepoNotFound
from server import access, body_stream, safe_serving
from server.errors import HubHTTPError, repo_not_found
from server.hf_common import ObjectResponse, json_object, repo_id_of
from server.state import ServerState
from w2w.errors import HubError

log = logging.getLogger("w2wreg.serve")
LFS_JSON = "application/vnd.git-lfs+json"
XET_REFUSED = (
    "this hub does not speak Xet: set HF_HUB_DISABLE_XET=1 for huggingface_hub to use Git LFS (w2wreg serve --lfs), "
    "or serve without --lfs (files then go in the commit itself)"
)
LINK_TTL = 3600  # seconds a link stays valid
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sign(secret: bytes, what: str, repo_id: str, oid: str, size: int, expires: int, part: int, chunk: int) -> str:
    message = f"{what}\n{repo_id}\n{oid}\n{size}\n{expires}\n{part}\n{chunk}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def _secret(root: Path) -> bytes:
    """The key links are signed with, made once per store (readable by its owner only)."""
    path = root / "lfs-links.key"
    root.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        path.unlink()  # a key whose writing was interrupted: a new one (links signed with it are refused)
        return _secret(root)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes()


def _lfs(body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=LFS_JSON)


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    secret = _secret(state.store.root)  # kept: links stay good across a restart (a multipart upload resumes)
    # multipart uploads in progress: (repo, oid, size, part size) -> the file and when its links expire (the
    # files outlive the process: a restarted server takes them up, registry.hubs.staging.PartedFile)
    uploads: dict[tuple, tuple[PartedFile, float]] = {}
    uploads_lock = threading.Lock()

    def link(what: str, repo_id: str, oid: str, size: int, expires: int, part: int = 0, chunk: int = 0) -> str:
        sig = _sign(secret, what, repo_id, oid, size, expires, part, chunk)
        return f"{quote(repo_id)}/{oid}?size={size}&expires={expires}&part={part}&chunk={chunk}&sig={sig}"

    def signed(what: str, repo_id: str, oid: str, request: Request) -> tuple[int, int, int]:
        """(size, part number, part size) of a link; 401 when it was not signed here for this or has expired."""
        q = request.query_params
        try:
            size, expires, part, chunk, sig = (int(q["size"]), int(q["expires"]), int(q["part"]), int(q["chunk"]),
                                               q["sig"])  # fmt: skip
        except (KeyError, ValueError):
            raise HubHTTPError(401, "this LFS link is not valid: ask the batch API for another") from None
        good = _sign(secret, what, repo_id, oid, size, expires, part, chunk)
        if not hmac.compare_digest(good, sig) or expires < time.time():
            raise HubHTTPError(401, "this LFS link is not valid or has expired: ask the batch API for another")
        return size, part, chunk

    def forget(key: tuple) -> None:
        with uploads_lock:
            found = uploads.pop(key, None)
        if found is not None:
            found[0].discard()

    def forget_expired() -> None:
        now = time.time()
        with uploads_lock:
            gone = [k for k, (_, expires) in uploads.items() if expires < now]
        for k in gone:
            forget(k)

    @r.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def batch(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        who = access.identity(state, request)
        body = await json_object(request, "{operation, objects: [{oid, size}], transfers, hash_algo}")
        operation = body.get("operation")
        if operation not in ("upload", "download"):
            raise HubHTTPError(400, "operation must be 'upload' or 'download'")
        if operation == "download":
            access.require_repo_read(state, who, repo_id)
        else:
            access.require_repo_write(state, who, request, repo_id)
        if not state.store.exists(repo_id):
            raise repo_not_found(repo_id)
        if body.get("hash_algo", "sha256") != "sha256":
            raise HubHTTPError(409, "only hash_algo sha256 is supported")
        transfers = body.get("transfers") or ["basic"]
        if "basic" not in transfers and "multipart" not in transfers:
            raise HubHTTPError(409, "only the basic and multipart transfers are supported")
        objects = body.get("objects")
        if not isinstance(objects, list) or len(objects) > 10_000:
            raise HubHTTPError(400, "objects must be a list of {oid, size} (at most 10,000)")
        forget_expired()
        base = str(request.base_url).rstrip("/")
        expires = int(time.time()) + LINK_TTL
        part_size = state.lfs_part_size
        out, multipart = [], False
        for o in objects:
            oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid) or not isinstance(size, int) or size < 0:
                why = {"code": 422, "message": "oid must be a sha256 and size a byte count"}
                out.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": why})
                continue
            held = state.store.repo_has_lfs(repo_id, oid, size)
            entry = {"oid": oid, "size": size, "authenticated": True}
            if operation == "download":
                if held:
                    href = f"{base}/api/lfs-download/{link('download', repo_id, oid, size, expires)}"
                    entry["actions"] = {"download": {"href": href, "expires_in": LINK_TTL}}
                else:  # as missing when another repo holds it: no telling
                    entry["error"] = {"code": 404, "message": f"{repo_id} has no LFS object {oid}"}
            elif held:  # the client skips the upload: the GC keeps the object for the commit to come
                state.store.freshen(oid)
            elif size > state.max_upload:
                why = {"code": 413, "message": f"{size} bytes is over this hub's limit of {state.max_upload}"}
                entry["error"] = why
            else:
                verify = {"href": f"{base}/{quote(repo_id)}.git/info/lfs/objects/verify"}
                if size > part_size and "multipart" in transfers or "basic" not in transfers:
                    multipart = True
                    n = max(1, -(-size // part_size))
                    header = {"chunk_size": str(part_size)}
                    header |= {str(i): f"{base}/api/lfs-part/{link('part', repo_id, oid, size, expires, i, part_size)}"
                               for i in range(1, n + 1)}  # fmt: skip
                    done = f"{base}/api/lfs-complete/{link('complete', repo_id, oid, size, expires, 0, part_size)}"
                    entry["actions"] = {"upload": {"href": done, "header": header, "expires_in": LINK_TTL},
                                        "verify": verify}  # fmt: skip
                else:
                    href = f"{base}/api/lfs-upload/{link('upload', repo_id, oid, size, expires)}"
                    entry["actions"] = {"upload": {"href": href, "expires_in": LINK_TTL}, "verify": verify}
            out.append(entry)
        transfer = "multipart" if multipart else "basic"
        return _lfs({"transfer": transfer, "objects": out, "hash_algo": "sha256"})

    @r.put("/api/lfs-upload/{ns}/{name}/{oid}")
    async def upload(ns: str, name: str, oid: str, request: Request):
        repo_id = repo_id_of(ns, name)
        size, _, _ = signed("upload", repo_id, oid, request)
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

    def parted(key: tuple, create: bool) -> PartedFile:
        """The multipart upload of `key` (repo, oid, size, part size), taken up from disk after a restart."""
        with uploads_lock:
            found = uploads.get(key)
            if found is None:
                upload = PartedFile(state.store, *key)
                if not create and not upload.done:
                    upload.discard()
                    raise HubHTTPError(404, "no parts of this upload were received: send them first")
                found = uploads[key] = (upload, time.time() + LINK_TTL)
            return found[0]

    @r.put("/api/lfs-part/{ns}/{name}/{oid}")
    async def upload_part(ns: str, name: str, oid: str, request: Request):
        repo_id = repo_id_of(ns, name)
        size, part, chunk = signed("part", repo_id, oid, request)
        upload = parted((repo_id, oid, size, chunk), create=True)
        try:
            etag = await body_stream.in_thread(
                request, lambda batches: upload.write_part(part, batches), upload.part_length(part) + 1
            )
        except HubError as e:
            raise HubHTTPError(400, str(e)) from None
        return Response(status_code=200, headers={"ETag": f'"{etag}"'})

    @r.post("/api/lfs-complete/{ns}/{name}/{oid}")
    async def complete(ns: str, name: str, oid: str, request: Request):
        repo_id = repo_id_of(ns, name)
        size, _, chunk = signed("complete", repo_id, oid, request)
        body = await json_object(request, "{oid, parts: [{partNumber, etag}]}")
        parts = body.get("parts")
        try:
            etags = {int(p["partNumber"]): str(p["etag"]).strip('"') for p in parts}
        except (TypeError, KeyError, ValueError):
            raise HubHTTPError(400, "parts must be a list of {partNumber, etag}") from None
        key = (repo_id, oid, size, chunk)
        upload = parted(key, create=False)
        try:
            await run_in_threadpool(upload.finish, etags)
            state.store.mark_lfs(repo_id, oid)
        except RepoNotFound:
            raise repo_not_found(repo_id) from None
        except HubError as e:
            raise HubHTTPError(400, str(e)) from None
        finally:  # kept or not, the parts go: a bad whole is sent again from the start
            await run_in_threadpool(forget, key)
        return _lfs({})

    @r.get("/api/lfs-download/{ns}/{name}/{oid}")
    def download(ns: str, name: str, oid: str, request: Request):
        repo_id = repo_id_of(ns, name)
        size, _, _ = signed("download", repo_id, oid, request)
        if not state.store.repo_has_lfs(repo_id, oid, size):
            raise HubHTTPError(404, f"{repo_id} has no LFS object {oid}")
        return ObjectResponse(state.store.object_path(oid), media_type="application/octet-stream",
                              headers=safe_serving.USER_CONTENT_HEADERS)  # fmt: skip

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

    @r.get("/api/models/{ns}/{name}/xet-{kind}-token/{revision:path}")
    def xet_token(ns: str, name: str, kind: str, revision: str, request: Request):
        # huggingface_hub with hf_xet sends every file preupload calls "lfs" through Xet (no fallback to LFS)
        # and hf_xet shows the status and this URL, not the message: the operator's log says it too
        access.require_repo_read(state, access.identity(state, request), repo_id_of(ns, name))
        log.warning("a client asked for Xet (%s/%s): %s", ns, name, XET_REFUSED)
        raise HubHTTPError(501, XET_REFUSED)

    return r
