"""Whole repos as the Hub's client manages them: create, delete, move, duplicate, settings (private), auth-check,
a namespace's repos with their storage (`list_user_repos`).

Each asks server.access: delete needs write on the repo, move write on the repo and on the target's
namespace, duplicate read on the repo and write on the target's namespace, settings write on the repo;
auth-check answers as a read (or a write) would.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from registry.hubs.store import RepoExists, RepoNotFound, RevisionNotFound
from server import access, indexing
from server.accounts import Identity
from server.errors import HubHTTPError, repo_not_found
from server.hf_common import iso, json_object, page, repo_id_of
from server.state import ServerState
from w2w.errors import W2WError

log = logging.getLogger("w2wreg.serve")

# what the Hub puts in a new model repo: a git clone of the repo keeps weights and archives in LFS
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
    "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS.split()).encode()


def _model_type(body: dict) -> None:
    kind = body.get("type") or "model"
    if kind != "model":
        raise HubHTTPError(400, f"this hub keeps model repos only, not {kind!r} repos")


def _named(body: dict, who: Identity) -> str:
    """The repo id of a {name, organization} body; without an organization, under the caller's name (as
    the Hub does for `create_repo("name")`)."""
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise HubHTTPError(400, "the body must name the repo: {name, organization}")
    ns = body.get("organization") or who.name
    if "/" in name and not body.get("organization"):
        ns, name = name.split("/", 1)
    return repo_id_of(str(ns), name)


def _repo_id(value, field: str) -> str:
    if not isinstance(value, str) or value.count("/") != 1:
        raise HubHTTPError(400, f"{field} must be a repo id NAMESPACE/NAME")
    return repo_id_of(*value.split("/"))


def _delete(state: ServerState, repo_id: str) -> None:
    """Delete the repo; its models stay, marked (server.indexing.repo_deleted), as readable as it was."""
    with state.lock:  # the registry's models and the repo change together for every reader
        try:
            private = bool(state.store.meta(repo_id).get("private"))
        except RepoNotFound:
            raise repo_not_found(repo_id) from None
        intent = indexing.intend(state.store, {"op": "delete", "repo": repo_id, "private": private})
        try:
            state.store.delete(repo_id)
        except RepoNotFound:
            intent.unlink()
            raise repo_not_found(repo_id) from None
        indexing.repo_deleted(state.registry, repo_id, private)
        intent.unlink()  # kept if the index update failed: the next start replays it


def _move(state: ServerState, src: str, dst: str) -> None:
    with state.lock:
        intent = indexing.intend(state.store, {"op": "move", "src": src, "dst": dst})
        try:
            state.store.move(src, dst)
        except (RepoNotFound, RepoExists) as e:
            intent.unlink()
            if isinstance(e, RepoExists):
                raise HubHTTPError(409, str(e)) from None
            raise repo_not_found(src) from None
        indexing.repo_moved(state.registry, src, dst)
        intent.unlink()  # kept if the index update failed: the next start replays it


def _duplicate(state: ServerState, src: str, dst: str, private: bool, who: Identity) -> bool:
    """A new repo `dst` holding the files of `src`'s main in one commit, indexed as a push of them would be;
    False when `dst` exists."""
    try:
        head = state.store.resolve(src)
    except RepoNotFound:
        raise repo_not_found(src) from None
    if not state.store.create(dst, private):
        return False
    commit = state.store.commit(dst, dict(head.files), message=f"Duplicate from {src}", author=who.name or "")
    if indexing.lora_path(set(commit.files)) is not None:
        with state.lock:
            try:
                result = indexing.index_commit(state.registry, state.store, dst, commit)
            except W2WError as e:  # the repo stands; the next start's catch-up retries
                log.error("%s@%s: indexing failed: %s", dst, commit.oid[:12], e)
                return True
        log.info("%s duplicated %s to %s: %s", who.name, src, dst, result.to_json() if result else None)
    return True


def storage_of(state: ServerState, namespace: str) -> list[dict]:
    """`list_user_repos` of a namespace: each repo's head, visibility and bytes (its head's files, as the
    repo's `usedStorage`), and its share of the namespace's bytes."""
    out = []
    for repo_id in state.store.list_repos():
        if repo_id.split("/")[0] != namespace:
            continue
        try:
            head, private = state.store.resolve(repo_id), access.repo_private(state, repo_id)
        except (RepoNotFound, RevisionNotFound):  # deleted meanwhile
            continue
        size = sum(e.size for e in head.files.values())
        out.append({"id": repo_id, "type": "model", "updatedAt": iso(head.created),
                    "visibility": "private" if private else "public", "storage": size})  # fmt: skip
    total = sum(r["storage"] for r in out) or 1
    return [r | {"storagePercent": 100 * r["storage"] / total} for r in out]


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    async def repo_request(request: Request, shape: str) -> tuple[Identity, dict]:
        """The caller (a user: 401 otherwise) and the JSON body of a /api/repos/ request about a model repo."""
        who = access.identity(state, request)
        access.require_user(who, request)
        body = await json_object(request, shape)
        _model_type(body)
        return who, body

    @r.post("/api/repos/create")
    async def create_repo(request: Request):
        who, body = await repo_request(request, "{name, organization, private}")
        repo_id = _named(body, who)
        access.require_namespace_write(who, request, repo_id.split("/")[0])
        private = bool(body.get("private")) or body.get("visibility") == "private"
        created = await run_in_threadpool(state.store.create, repo_id, private, {".gitattributes": GITATTRIBUTES})
        url = f"{str(request.base_url).rstrip('/')}/{repo_id}"
        if not created:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        log.info("%s created %s", who.name, repo_id)
        return {"url": url, "name": repo_id, "id": repo_id}

    @r.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        who, body = await repo_request(request, "{name, organization, type}")
        repo_id = _named(body, who)
        access.require_repo_write(state, who, request, repo_id)
        await run_in_threadpool(_delete, state, repo_id)
        log.info("%s deleted %s", who.name, repo_id)
        return {}

    @r.post("/api/repos/move")
    async def move_repo(request: Request):
        who, body = await repo_request(request, "{fromRepo, toRepo, type}")
        src, dst = _repo_id(body.get("fromRepo"), "fromRepo"), _repo_id(body.get("toRepo"), "toRepo")
        access.require_repo_write(state, who, request, src)
        access.require_namespace_write(who, request, dst.split("/")[0])
        if src == dst:
            raise HubHTTPError(400, f"{src} is already named {dst}")
        await run_in_threadpool(_move, state, src, dst)
        log.info("%s moved %s to %s", who.name, src, dst)
        return {}

    @r.post("/api/models/{ns}/{name}/duplicate")
    async def duplicate_repo(ns: str, name: str, request: Request):
        src = repo_id_of(ns, name)
        who = access.identity(state, request)
        access.require_user(who, request)
        access.require_repo_read(state, who, src)
        body = await json_object(request, "{repository, visibility}")
        dst = _repo_id(body.get("repository"), "repository")
        access.require_namespace_write(who, request, dst.split("/")[0])
        visibility = body.get("visibility")
        if visibility not in (None, "public", "private"):
            raise HubHTTPError(400, f"visibility {visibility!r}: a repo here is public or private")
        private = access.repo_private(state, src) if visibility is None else visibility == "private"
        url = f"{str(request.base_url).rstrip('/')}/{dst}"
        if not await run_in_threadpool(_duplicate, state, src, dst, private, who):  # (exist_ok reads the url)
            return JSONResponse({"error": f"You already created this model repo: {dst}", "url": url}, status_code=409)
        return {"url": url, "filesCopyPending": False}

    @r.put("/api/models/{ns}/{name}/settings")
    async def settings(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        who = access.identity(state, request)
        access.require_repo_write(state, who, request, repo_id)
        body = await json_object(request, "{private, gated, ...}")
        if body.get("gated") not in (None, False, "false"):
            raise HubHTTPError(400, "this hub has no gated repos: a repo is public or private")
        private = body.get("private")
        if body.get("visibility") in ("private", "public"):
            private = body["visibility"] == "private"
        if private is not None:
            if not isinstance(private, bool):
                raise HubHTTPError(400, "private must be true or false")
            try:
                await run_in_threadpool(state.store.set_private, repo_id, private)
            except RepoNotFound:
                raise repo_not_found(repo_id) from None
        return {}

    @r.get("/api/settings/repositories")
    def my_repositories(request: Request):
        who = access.identity(state, request)
        user = access.require_user(who, request)
        return page(request, storage_of(state, user))

    @r.get("/api/organizations/{org}/settings/repositories")
    def org_repositories(org: str, request: Request):
        access.require_namespace_write(access.identity(state, request), request, org)  # its members
        return page(request, storage_of(state, org))

    @r.get("/api/models/{ns}/{name}/likers")
    def likers(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_read(state, access.identity(state, request), repo_id)
        if not state.store.exists(repo_id):
            raise repo_not_found(repo_id)
        return []  # this hub keeps no likes (every repo's `likes` is 0)

    @r.get("/api/models/{ns}/{name}/auth-check")
    def auth_check(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_read(state, access.identity(state, request), repo_id)
        return {}

    @r.get("/api/models/{ns}/{name}/auth-check/write")
    def auth_check_write(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        who = access.identity(state, request)
        access.require_repo_write(state, who, request, repo_id)
        if not state.store.exists(repo_id):
            raise repo_not_found(repo_id)
        return {}

    return r
