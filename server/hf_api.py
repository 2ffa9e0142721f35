"""The Hugging Face Hub protocol for model repos, as the unmodified huggingface_hub client speaks it.

Covered: create_repo, preupload (every file "regular") and the NDJSON commit (upload_file,
upload_folder, create_commit, deletions), model_info / repo_info (also at a revision), list_models
(search, author, limit), list_repo_tree / list_repo_files, list_repo_commits, whoami, validate-yaml, and
HEAD / GET of `/{repo}/resolve/{revision}/{path}` (hf_hub_download, snapshot_download, diffusers'
load_lora_weights). Not covered: LFS / Xet transfers, branches other than `main`, pull requests, datasets
and Spaces; those requests get a clear 400.

Errors carry `X-Error-Code` / `X-Error-Message` as the Hub's do, so the client raises its own
RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError. Who may read and write which repo is
server.access's rule; files are served as server.safe_serving says (never as a page of this origin).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from email.utils import formatdate

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from registry.hubs import validate_repo_id
from registry.hubs.store import BRANCH, Commit, ParentMismatch, RepoNotFound, RevisionNotFound, validate_path
from registry.model_card import parse_front_matter
from registry.nesting import loads_json
from server import access, indexing, safe_serving
from server.accounts import Identity
from server.errors import AUTH_ERROR, HubHTTPError, error_response, repo_not_found  # noqa: F401 (the app's)
from server.state import ServerState
from w2w.errors import HubError, W2WError

log = logging.getLogger("w2wreg.serve")


def _repo(ns: str, name: str) -> str:
    repo_id = f"{ns}/{name}"
    try:
        return validate_repo_id(repo_id)
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None


def _resolve(state: ServerState, repo_id: str, revision: str) -> Commit:
    try:
        return state.store.resolve(repo_id, revision)
    except RepoNotFound:
        raise repo_not_found(repo_id) from None
    except RevisionNotFound as e:
        raise HubHTTPError(404, str(e), "RevisionNotFound") from None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def model_info_json(state: ServerState, repo_id: str, commit: Commit, base_url: str) -> dict:
    card = indexing.card_of(state.store, commit)
    meta = state.store.meta(repo_id)
    tags = card.get("tags") if isinstance(card.get("tags"), list) else []
    return {
        "_id": repo_id,
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0],
        "sha": commit.oid,
        "lastModified": _iso(commit.created),
        "createdAt": _iso(meta.get("created", commit.created)),
        "private": bool(meta.get("private")),
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "library_name": card.get("library_name"),
        "tags": [str(t) for t in tags],
        "pipeline_tag": card.get("pipeline_tag"),
        "cardData": card or None,
        "siblings": [{"rfilename": p, "size": e.size, "blobId": e.oid} for p, e in commit.files.items()],
        "usedStorage": sum(e.size for e in commit.files.values()),
        "url": f"{base_url}/{repo_id}",
    }


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)  # the OpenAPI description is the w2w API's; this one is the Hub's

    @r.post("/api/repos/create")
    async def create_repo(request: Request):
        who = access.identity(state, request)
        access.require_user(who, request)
        try:
            body = loads_json(await read_limited(request, SMALL_BODY) or b"{}", "the body")
        except ValueError as e:
            raise HubHTTPError(400, f"the body must be JSON: {{name, organization, private}} ({e})") from None
        if not isinstance(body, dict):
            raise HubHTTPError(400, "the body must be a JSON object")
        if body.get("type", "model") != "model":
            raise HubHTTPError(400, f"this hub keeps model repos only, not {body.get('type')!r}")
        if not body.get("organization"):
            raise HubHTTPError(400, "give the repo id as NAMESPACE/NAME")
        repo_id = _repo(str(body["organization"]), str(body.get("name", "")))
        access.require_namespace_write(who, request, repo_id.split("/")[0])
        private = bool(body.get("private")) or body.get("visibility") == "private"
        created = await run_in_threadpool(state.store.create, repo_id, private)
        url = f"{str(request.base_url).rstrip('/')}/{repo_id}"
        if not created:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        return {"url": url, "name": repo_id, "id": repo_id}

    @r.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        try:
            content = loads_json(await read_limited(request, SMALL_BODY), "the body").get("content", "")
            parse_front_matter(content)
        except (ValueError, AttributeError, TypeError, yaml.YAMLError) as e:
            return JSONResponse({"errors": [{"message": f"invalid YAML front matter: {e}"}]}, status_code=400)
        return {"errors": [], "warnings": []}

    @r.get("/api/whoami-v2")
    def whoami(request: Request):
        who = access.identity(state, request)
        if not who.authenticated:
            raise HubHTTPError(401, AUTH_ERROR)
        return {
            "type": "user",
            "id": who.name,
            "name": who.name,
            "fullname": who.name,
            "orgs": [{"type": "org", "name": o, "id": o, "fullname": o} for o in sorted(who.orgs)],
            "auth": {"type": "access_token"},
        }

    @r.post("/api/models/{ns}/{name}/preupload/{revision}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        repo_id = _repo(ns, name)
        access.require_repo_write(state, access.identity(state, request), request, repo_id)
        _check_branch(revision, request)
        head = await run_in_threadpool(_resolve, state, repo_id, revision)
        try:
            files = loads_json(await read_limited(request, state.max_upload), "the body")["files"]
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HubHTTPError(400, "the body must be JSON: {files: [{path, size, sample}]}") from None
        out = []
        for f in files:
            path = _valid_path(str(f.get("path", "")))
            size = f.get("size")
            if isinstance(size, int) and size > state.max_upload:
                raise HubHTTPError(413, f"{path}: {size} bytes is over this hub's limit of {state.max_upload}")
            known = head.files.get(path)
            out.append(
                {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": known.oid if known else None}
            )
        return {"files": out, "commitOid": head.oid}

    @r.post("/api/models/{ns}/{name}/commit/{revision}")
    async def commit(ns: str, name: str, revision: str, request: Request):
        repo_id = _repo(ns, name)
        who = access.identity(state, request)
        access.require_repo_write(state, who, request, repo_id)
        _check_branch(revision, request)
        if not state.store.exists(repo_id):
            raise HubHTTPError(404, f"Repository {repo_id} not found: create it first", "RepoNotFound")
        body = await read_limited(request, state.max_upload)  # a client that hangs up mid-body stops here
        return await run_in_threadpool(_commit, state, repo_id, body, who, str(request.base_url).rstrip("/"))

    @r.get("/api/models")
    def list_models(request: Request, search: str | None = None, author: str | None = None, limit: int | None = None):
        who = access.identity(state, request)
        access.require_server_read(state, who)
        base = str(request.base_url).rstrip("/")
        out = []
        for repo_id in state.store.list_repos():
            if search and search.lower() not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            if not access.can_read_repo(state, who, repo_id):
                continue
            out.append(model_info_json(state, repo_id, state.store.resolve(repo_id), base))
            if limit and len(out) >= limit:
                break
        return out

    @r.get("/api/models/{ns}/{name}")
    def model_info(ns: str, name: str, request: Request):
        return _model_info(ns, name, BRANCH, request)

    @r.get("/api/models/{ns}/{name}/revision/{revision}")
    def model_info_at(ns: str, name: str, revision: str, request: Request):
        return _model_info(ns, name, revision, request)

    def _readable_repo(ns: str, name: str, request: Request) -> str:
        repo_id = _repo(ns, name)
        access.require_repo_read(state, access.identity(state, request), repo_id)  # a private server too
        return repo_id

    def _model_info(ns, name, revision, request):
        repo_id = _readable_repo(ns, name, request)
        commit = _resolve(state, repo_id, revision)
        return model_info_json(state, repo_id, commit, str(request.base_url).rstrip("/"))

    @r.get("/api/models/{ns}/{name}/tree/{revision}")
    def tree_root(ns: str, name: str, revision: str, request: Request, recursive: str = "false"):
        return _tree(ns, name, revision, "", recursive, request)

    @r.get("/api/models/{ns}/{name}/tree/{revision}/{path:path}")
    def tree(ns: str, name: str, revision: str, path: str, request: Request, recursive: str = "false"):
        return _tree(ns, name, revision, path, recursive, request)

    def _tree(ns, name, revision, path, recursive, request):
        repo_id = _readable_repo(ns, name, request)
        commit = _resolve(state, repo_id, revision)
        if path.strip("/"):
            _valid_path(path.strip("/"))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        deep = recursive.lower() in ("1", "true", "yes")
        entries, folders = [], set()
        for p, e in commit.files.items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts) if deep else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:i]))
            if deep or len(parts) == 1:
                entries.append({"type": "file", "oid": e.oid, "size": e.size, "path": p})
        if prefix and not entries and not folders:
            raise HubHTTPError(404, f"{path!r} is not in {repo_id} at {commit.oid[:12]}", "EntryNotFound")
        dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return dirs + entries

    @r.get("/api/models/{ns}/{name}/commits/{revision}")
    def commits(ns: str, name: str, revision: str, request: Request):
        repo_id = _readable_repo(ns, name, request)
        start = _resolve(state, repo_id, revision)
        out, c = [], start
        while c is not None:
            out.append(
                {
                    "id": c.oid,
                    "authors": [{"user": c.author or "w2wreg"}],
                    "date": _iso(c.created),
                    "title": c.message,
                    "message": c.description,
                }
            )
            c = state.store.resolve(repo_id, c.parent) if c.parent else None
        return out

    @r.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(ns: str, name: str, revision: str, path: str, request: Request):
        repo_id = _readable_repo(ns, name, request)
        commit = _resolve(state, repo_id, revision)
        entry = commit.files.get(_valid_path(path))
        if entry is None:
            raise HubHTTPError(404, f"{path!r} is not in {repo_id} at {commit.oid[:12]}", "EntryNotFound")
        media_type, disposition = safe_serving.download_type(path)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.oid}"',
            "Last-Modified": formatdate(commit.created, usegmt=True),
            "Accept-Ranges": "bytes",
            **safe_serving.USER_CONTENT_HEADERS,
        }
        return FileResponse(
            state.store.object_path(entry.sha256),
            headers=headers,
            media_type=media_type,
            filename=path.rsplit("/", 1)[-1],
            content_disposition_type=disposition,
        )

    return r


SMALL_BODY = 1 << 20  # create-repo and validate-yaml bodies: a model card is kilobytes


def _check_branch(revision: str, request: Request) -> None:
    if request.query_params.get("create_pr"):
        raise HubHTTPError(400, "this hub does not take pull requests: commit to main")
    if revision != BRANCH:
        raise HubHTTPError(400, f"this hub commits to {BRANCH!r} only, not {revision!r}")


def _valid_path(path: str) -> str:
    try:
        return validate_path(path)
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HubHTTPError(413, f"the request has {declared} bytes; this hub takes at most {limit}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise HubHTTPError(413, f"the request is over this hub's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_commit(body: bytes) -> tuple[dict, dict[str, bytes], list[str], list[str]]:
    header: dict = {}
    added: dict[str, bytes] = {}
    deleted: list[str] = []
    deleted_folders: list[str] = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = loads_json(line, f"commit line {n}")
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError) as e:
            why = f" ({e})" if isinstance(e, ValueError) else ""
            raise HubHTTPError(400, f"commit line {n}: not a JSON object with 'key' and 'value'{why}") from None
        if not isinstance(value, dict):
            raise HubHTTPError(400, f"commit line {n}: 'value' must be a JSON object")
        if key == "header":
            header = value
        elif key == "file":
            path = _valid_path(str(value.get("path", "")))
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(400, f"commit line {n}: {path}: only base64 content is taken")
            try:
                added[path] = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, ValueError):
                raise HubHTTPError(400, f"commit line {n}: {path}: content is not valid base64") from None
        elif key == "deletedFile":
            deleted.append(_valid_path(str(value.get("path", ""))))
        elif key == "deletedFolder":
            deleted_folders.append(_valid_path(str(value.get("path", "")).rstrip("/")))
        elif key in ("lfsFile", "copyFile"):
            raise HubHTTPError(400, f"commit line {n}: {key} is not supported by this hub (it answers 'regular')")
        else:
            raise HubHTTPError(400, f"commit line {n}: unknown operation {key!r}")
    if not header.get("summary"):
        raise HubHTTPError(400, "the commit has no header with a summary (commit message)")
    return header, added, deleted, deleted_folders


def _commit(state: ServerState, repo_id: str, body: bytes, who: Identity, base_url: str) -> dict:
    user = who.name or ""
    header, added, deleted, deleted_folders = _parse_commit(body)
    # Check the LoRA the commit would leave at the head before anything is written: a push that cannot
    # be indexed is refused whole.
    head = _resolve(state, repo_id, BRANCH)
    kept = {p for p in head.files if p not in deleted and not any(p.startswith(f + "/") for f in deleted_folders)}
    after = kept | set(added)
    lora = indexing.lora_path(after)
    brings_lora = lora is not None and lora in added  # a commit that leaves the LoRA as it was indexes nothing
    if brings_lora:
        cfg_path = (lora.rsplit("/", 1)[0] + "/" if "/" in lora else "") + "adapter_config.json"
        cfg = added.get(cfg_path) or (state.store.read(head.files[cfg_path]) if cfg_path in head.files else None)
        try:
            indexing.read_lora_bytes(lora, added[lora], cfg)
        except W2WError as e:
            raise HubHTTPError(422, str(e)) from None
    entries = {p: state.store.put_object(data) for p, data in added.items()}
    try:
        commit = state.store.commit(
            repo_id,
            entries,
            deleted,
            deleted_folders,
            message=str(header["summary"]),
            description=str(header.get("description") or ""),
            parent=header["parentCommit"] if isinstance(header.get("parentCommit"), str) else None,
            author=user,
        )
    except ParentMismatch as e:
        raise HubHTTPError(412, str(e)) from None
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None
    log.info("%s committed %s to %s (%d files)", user, commit.oid[:12], repo_id, len(entries))
    out = {"commitUrl": f"{base_url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "pullRequestUrl": None}
    if brings_lora:
        with state.lock:
            try:
                result = indexing.index_commit(state.registry, state.store, repo_id, commit)
            except W2WError as e:  # the commit stands; the next start's catch-up retries
                log.error("%s@%s: indexing failed: %s", repo_id, commit.oid[:12], e)
                result = indexing.IndexResult(error=str(e))
            if result is not None:
                # "duplicate of X": not the name of a model the pusher may not read
                v = access.ModelView(state, who)
                out["w2w"] = {k: v.redact(x) if isinstance(x, str) else x for k, x in result.to_json().items()}
    return out
