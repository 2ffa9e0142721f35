"""Branches and tags as the Hub's client uses them: list_repo_refs, create/delete_branch, create/delete_tag,
super_squash_history. Refs are read as the repo is (a branch of a private repo is as private as the repo)
and written by those who may write it."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from registry.hubs.store import RefExists, RepoNotFound
from server import access
from server.errors import HubHTTPError, repo_not_found
from server.hf_common import json_object, raw_rest, repo_id_of, store_lookups
from server.state import ServerState
from w2w.errors import HubError

log = logging.getLogger("w2wreg.serve")


async def _store_call(fn, repo_id: str, *args):
    """A store write, its errors as the Hub's: 404 repo / revision, 409 an existing ref, 400 a bad name."""
    try:
        with store_lookups(repo_id):
            return await run_in_threadpool(fn, repo_id, *args)
    except RefExists as e:
        raise HubHTTPError(409, str(e)) from None
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def writer(ns: str, name: str, request: Request) -> tuple[str, str]:
        repo_id = repo_id_of(ns, name)
        user = access.require_repo_write(state, access.identity(state, request), request, repo_id)
        if not state.store.exists(repo_id):
            raise repo_not_found(repo_id)
        return repo_id, user

    @r.get("/api/models/{ns}/{name}/refs")
    def refs(ns: str, name: str, request: Request):
        repo_id = repo_id_of(ns, name)
        access.require_repo_read(state, access.identity(state, request), repo_id)
        try:
            branches, tags = state.store.branches(repo_id), state.store.tags(repo_id)
        except RepoNotFound:
            raise repo_not_found(repo_id) from None
        out = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in branches.items()],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in tags.items()],
            "converts": [],
        }
        if request.query_params.get("include_prs"):
            out["pullRequests"] = []
        return out

    @r.post("/api/models/{ns}/{name}/branch/{branch:path}")
    async def create_branch(ns: str, name: str, branch: str, request: Request):
        branch = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id, user = writer(ns, name, request)
        body = await json_object(request, "{startingPoint}")
        start = body.get("startingPoint")
        if start is not None and not isinstance(start, str):
            raise HubHTTPError(400, "startingPoint must be a revision (a branch, tag or commit)")
        commit = await _store_call(state.store.create_branch, repo_id, branch, start)
        log.info("%s made branch %s of %s at %s", user, branch, repo_id, commit.oid[:12])
        return {}

    @r.delete("/api/models/{ns}/{name}/branch/{branch:path}")
    async def delete_branch(ns: str, name: str, branch: str, request: Request):
        branch = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id, user = writer(ns, name, request)
        await _store_call(state.store.delete_branch, repo_id, branch)
        log.info("%s deleted branch %s of %s", user, branch, repo_id)
        return {}

    @r.post("/api/models/{ns}/{name}/tag/{revision:path}")
    async def create_tag(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id, user = writer(ns, name, request)
        body = await json_object(request, "{tag, message}")
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise HubHTTPError(400, "the body must name the tag: {tag, message}")
        commit = await _store_call(state.store.create_tag, repo_id, tag, revision)
        log.info("%s tagged %s of %s as %s", user, commit.oid[:12], repo_id, tag)
        return {}

    @r.delete("/api/models/{ns}/{name}/tag/{tag:path}")
    async def delete_tag(ns: str, name: str, tag: str, request: Request):
        tag = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id, user = writer(ns, name, request)
        await _store_call(state.store.delete_tag, repo_id, tag)
        log.info("%s deleted tag %s of %s", user, tag, repo_id)
        return {}

    @r.post("/api/models/{ns}/{name}/super-squash/{branch:path}")
    async def super_squash(ns: str, name: str, branch: str, request: Request):
        branch = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id, user = writer(ns, name, request)
        body = await json_object(request, "{message}")
        message = body.get("message") or f"Super-squash branch '{branch}'"
        commit = await _store_call(state.store.squash, repo_id, branch, str(message), user)
        return {"commitOid": commit.oid}

    return r
