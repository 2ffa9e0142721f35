"""The Hugging Face Hub protocol for model repos, as the unmodified huggingface_hub client speaks it.

This module: model_info / repo_info (at any revision), list_models, list_repo_tree / list_repo_files,
get_paths_info, list_repo_commits, whoami, validate-yaml, and HEAD / GET of `/{repo}/resolve/{revision}/{path}`
(hf_hub_download, snapshot_download, diffusers' load_lora_weights). Writing files: server.hf_commit;
branches and tags: server.hf_refs; create / delete / move / settings / auth-check: server.hf_repos. A
revision is a branch, a tag (`refs/heads/..`, `refs/tags/..` too) or a commit. Git LFS uploads: server.hf_lfs.
Not covered: Xet, pull requests, datasets and Spaces; those requests get a clear 4xx (server.hf_unsupported).

Errors carry `X-Error-Code` / `X-Error-Message` as the Hub's do, so the client raises its own
RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError. Who may read and write which repo is
server.access's rule; files are served as server.safe_serving says (never as a page of this origin).
"""

from __future__ import annotations

import logging
import re
from email.utils import formatdate
from functools import partial
from urllib.parse import parse_qs

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from registry.hubs.store import BRANCH, Commit, FileEntry, lfs_pointer
from registry.model_card import parse_front_matter
from registry.nesting import loads_json
from server import (
    access,
    hf_commit,
    hf_expand,
    hf_lfs,
    hf_lfs_files,
    hf_refs,
    hf_repos,
    hf_unsupported,
    indexing,
    safe_serving,
)
from server.errors import AUTH_ERROR, HubHTTPError, error_response, repo_not_found  # noqa: F401 (the app's)
from server.hf_common import (
    EXPANDED_PAGE,
    SMALL_BODY,
    ObjectResponse,
    iso,
    page,
    raw_rest,
    read_limited,
    repo_id_of,
    resolve,
    revision_and_path,
    valid_path,
)
from server.state import ServerState

log = logging.getLogger("w2wreg.serve")


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
        "lastModified": iso(commit.created),
        "createdAt": iso(meta.get("created", commit.created)),
        "private": bool(meta.get("private")),
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "library_name": card.get("library_name"),
        "tags": [str(t) for t in tags],
        "pipeline_tag": card.get("pipeline_tag"),
        "cardData": card or None,
        "siblings": [_sibling(p, e) for p, e in commit.files.items()],
        "usedStorage": sum(e.size for e in commit.files.values()),
        "url": f"{base_url}/{repo_id}",
    }


def _sibling(path: str, e: FileEntry) -> dict:
    out = {"rfilename": path, "size": e.size, "blobId": e.oid}
    if e.lfs:  # model_info(files_metadata=True) reads it as the file's BlobLfsInfo
        out["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
    return out


_EXPAND_NAME = re.compile(r"[A-Za-z][A-Za-z_-]{0,63}")


def expanded(info: dict, request: Request) -> dict:
    """model_info / list_models with `expand=`: only the properties asked for (and the id), as the Hub
    answers; a property this hub does not keep (downloadsAllTime, gguf, ...) is left out."""
    wanted = request.query_params.getlist("expand") + request.query_params.getlist("expand[]")
    if not wanted:
        return info
    bad = [w for w in wanted if not _EXPAND_NAME.fullmatch(w)]
    if bad:
        raise HubHTTPError(400, f"expand: {bad[0]!r} is not a property name")
    return {k: v for k, v in info.items() if k in ("_id", "id") or k in wanted}


# list_models' sort= (the client's names): the field sorted on, and whether the largest comes first
SORTS = {
    None: (None, False),
    "id": ("id", False),
    "lastModified": ("lastModified", True),
    "createdAt": ("createdAt", True),
    "downloads": ("downloads", True),
    "likes": ("likes", True),
    "trendingScore": ("likes", True),  # no trend here: every repo scores 0
}


def file_json(path: str, e: FileEntry) -> dict:
    """A file as the tree and paths-info list it; an LFS file with its `lfs` block."""
    out = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
    if e.lfs:
        out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
    return out


def _yes(flag: str | bool | None) -> bool:
    """A query, form or JSON flag: true, "1", "true" or "yes" (any case)."""
    return flag is True or (isinstance(flag, str) and flag.lower() in ("1", "true", "yes"))


def _filter_tags(info: dict) -> set[str]:
    """What `filter=` matches, as on the Hub: the card's tags, library, pipeline tag, base model."""
    card = info.get("cardData") or {}
    tags = set(info["tags"]) | {t for t in (info["library_name"], info["pipeline_tag"]) if isinstance(t, str)}
    base = card.get("base_model")
    for b in base if isinstance(base, list) else [base]:
        if isinstance(b, str):
            tags |= {f"base_model:{b}", f"base_model:adapter:{b}"}
    return tags


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)  # the OpenAPI description is the w2w API's; this one is the Hub's
    r.include_router(hf_unsupported.build_router())  # first: /datasets/NS/NAME/resolve/... is no model's file
    for module in (hf_repos, hf_commit, hf_refs, hf_lfs, hf_lfs_files):
        r.include_router(module.build_router(state))

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
            "isPro": False,
            "orgs": [
                {"type": "org", "name": o, "id": o, "fullname": o, "roleInOrg": "write"} for o in sorted(who.orgs)
            ],
            "auth": {"type": "access_token", "accessToken": {"displayName": "token", "role": "write"}},
        }

    @r.get("/api/models")
    def list_models(
        request: Request,
        search: str | None = None,
        author: str | None = None,
        limit: int | None = None,
        sort: str | None = None,
        full: str | None = None,
        cardData: str | None = None,  # noqa: N803 (the Hub's name)
        pipeline_tag: str | None = None,
    ):
        who = access.identity(state, request)
        access.require_server_read(state, who)
        if limit is not None and limit < 0:
            raise HubHTTPError(400, "limit must be a positive number")
        if sort not in SORTS:
            raise HubHTTPError(400, f"sort must be one of {', '.join(k for k in SORTS if k)}, not {sort!r}")
        wanted = set(request.query_params.getlist("filter"))
        wanted_props = set(request.query_params.getlist("expand") + request.query_params.getlist("expand[]"))
        base = str(request.base_url).rstrip("/")
        out = []
        for repo_id in state.store.list_repos():
            if search and search.lower() not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            if not access.can_read_repo(state, who, repo_id):
                continue
            head = state.store.resolve(repo_id)
            info = model_info_json(state, repo_id, head, base)
            if not wanted <= _filter_tags(info) or (pipeline_tag and info["pipeline_tag"] != pipeline_tag):
                continue
            times = {"lastModified": head.created, "createdAt": state.store.meta(repo_id).get("created", 0)}
            out.append((info, times))
        key, newest_first = SORTS[sort]
        if key:  # on the times themselves: two commits may share a millisecond
            out.sort(key=lambda m: m[1].get(key, m[0][key]), reverse=newest_first)
        out = [info for info, _ in out]
        out = out[:limit] if limit else out
        for info in out:  # as the Hub: files and the card only when asked for
            if not _yes(full) and "siblings" not in wanted_props:
                info.pop("siblings")
            if not (_yes(full) or _yes(cardData)) and "cardData" not in wanted_props:
                info.pop("cardData")
        return page(request, [expanded(info, request) for info in out])

    def readable(ns: str, name: str, request: Request) -> str:
        repo_id = repo_id_of(ns, name)
        access.require_repo_read(state, access.identity(state, request), repo_id)  # a private server too
        return repo_id

    def info(ns: str, name: str, revision: str, request: Request) -> dict:
        repo_id = readable(ns, name, request)
        commit = resolve(state, repo_id, revision)
        return expanded(model_info_json(state, repo_id, commit, str(request.base_url).rstrip("/")), request)

    @r.get("/api/models/{ns}/{name}")
    def model_info(ns: str, name: str, request: Request):
        return info(ns, name, BRANCH, request)

    @r.get("/api/models/{ns}/{name}/revision/{revision:path}")
    def model_info_at(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        return info(ns, name, revision, request)

    @r.get("/api/models/{ns}/{name}/tree/{rest:path}")
    def tree(ns: str, name: str, rest: str, request: Request, recursive: str = "false", expand: str = "false"):
        repo_id = readable(ns, name, request)
        revision, path = revision_and_path(request, 5)
        commit = resolve(state, repo_id, revision)
        path = path.strip("/")
        if path:
            valid_path(path)
        prefix = path + "/" if path else ""
        deep = recursive.lower() in ("1", "true", "yes")
        entries, folders = [], set()
        for p, e in commit.files.items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for i in range(1, len(parts) if deep else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:i]))
            if deep or len(parts) == 1:
                entries.append(file_json(p, e))
        if prefix and not entries and not folders:
            raise HubHTTPError(404, f"{path!r} is not in {repo_id} at {commit.oid[:12]}", "EntryNotFound")
        dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        if not _yes(expand):
            return page(request, dirs + entries)
        return page(request, dirs + entries, partial(hf_expand.expand, state.store, repo_id, commit), EXPANDED_PAGE)

    @r.post("/api/models/{ns}/{name}/paths-info/{revision:path}")
    async def paths_info(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id = readable(ns, name, request)
        commit = resolve(state, repo_id, revision)
        body = await read_limited(request, SMALL_BODY)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                form = loads_json(body, "the body")
                paths, expand = form.get("paths", []), _yes(form.get("expand"))
            except (ValueError, AttributeError):
                raise HubHTTPError(400, "the body must be JSON {paths: [...]} or a form with paths=") from None
        else:
            form = parse_qs(body.decode("utf-8", "replace"))
            paths, expand = form.get("paths", []), _yes((form.get("expand") or [None])[-1])
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise HubHTTPError(400, "paths must be a list of file paths")
        out = []
        for p in dict.fromkeys(p.strip("/") for p in paths):
            if not p:
                continue
            valid_path(p)
            entry = commit.files.get(p)
            if entry is not None:
                out.append(file_json(p, entry))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append({"type": "directory", "path": p, "oid": "0" * 40, "size": 0})
        if expand:  # a walk of the history: not in the event loop
            return await run_in_threadpool(hf_expand.expand, state.store, repo_id, commit, out)
        return out

    @r.get("/api/models/{ns}/{name}/commits/{revision:path}")
    def commits(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id = readable(ns, name, request)
        resolve(state, repo_id, revision)  # 404s as the Hub's
        return page(
            request,
            [
                {
                    "id": c.oid,
                    "authors": [{"user": c.author or "w2wreg"}],
                    "date": iso(c.created),
                    "title": c.message,
                    "message": c.description,
                }
                for c in state.store.history(repo_id, revision)
            ],
        )

    @r.api_route("/{ns}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
    def resolve_file(ns: str, name: str, rest: str, request: Request):
        repo_id = readable(ns, name, request)
        revision, path = revision_and_path(request, 3)
        commit = resolve(state, repo_id, revision)
        entry = commit.files.get(valid_path(path))
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
        if entry.lfs:  # as the Hub: the client names its cached copy by the sha256
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        return ObjectResponse(
            state.store.object_path(entry.sha256),
            headers=headers,
            media_type=media_type,
            filename=path.rsplit("/", 1)[-1],
            content_disposition_type=disposition,
        )

    return r
