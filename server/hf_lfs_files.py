"""A repo's LFS files as the Hub's storage settings list them (`HfApi.list_lfs_files`), and the refusal of
`permanently_delete_lfs_files`: this hub does not rewrite history (a file is deleted by a commit, the
history by `super_squash_history`, and the objects no revision names by the operator's `w2wreg hub gc`).

Both need write on the repo, as on the Hub (a repo's storage is its owners' business).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from registry.hubs.store import BRANCH, RepoNotFound
from server import access
from server.errors import HubHTTPError, repo_not_found
from server.hf_common import iso, page, repo_id_of
from server.state import ServerState


def lfs_files(state: ServerState, repo_id: str) -> list[dict]:
    """One item per LFS object of the repo's history (every branch and tag), where it was first committed:
    the path, the branch whose history holds it, when. Oldest first."""
    store = state.store
    try:
        branches = sorted(store.branches(repo_id), key=lambda b: (b != BRANCH, b))  # main's history first
        refs = [(f"refs/heads/{b}", f"refs/heads/{b}") for b in branches]
        refs += [(f"refs/tags/{t}", None) for t in store.tags(repo_id)]
    except RepoNotFound:
        raise repo_not_found(repo_id) from None
    first: dict[str, dict] = {}
    seen: set[str] = set()
    for revision, ref in refs:
        for commit in reversed(store.history(repo_id, revision)):  # oldest first: where each object came in
            if commit.oid in seen:
                continue
            seen.add(commit.oid)
            for path, e in sorted(commit.files.items()):
                if e.lfs and e.sha256 not in first:
                    first[e.sha256] = {"fileOid": e.sha256, "oid": e.sha256, "filename": path, "size": e.size,
                                       "pushedAt": iso(commit.created), "ref": ref}  # fmt: skip
    return sorted(first.values(), key=lambda f: (f["pushedAt"], f["filename"]))


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/api/models/{ns}/{name}/lfs-files")
    async def list_lfs_files(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_write(state, access.identity(state, request), request, repo_id)
        return page(request, await run_in_threadpool(lfs_files, state, repo_id))

    @r.post("/api/models/{ns}/{name}/lfs-files/batch")
    def delete_lfs_files(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_write(state, access.identity(state, request), request, repo_id)
        raise HubHTTPError(
            400,
            "this hub does not delete LFS objects from a repo's history: delete the file in a commit, then "
            "super_squash_history the branch; the operator's `w2wreg hub gc` frees what no revision names",
        )

    return r
