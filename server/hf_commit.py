"""Writing to a repo as the Hub's client does: preupload, then the NDJSON commit to a branch.

A commit to `main` that brings a LoRA is checked before anything is written (a file that is not a readable
LoRA refuses the commit whole) and indexed after (server.indexing); one that changes only the card updates
the model's attributes. Other branches are stored only, unless the server indexes branches
(`--index-branches`).
"""

from __future__ import annotations

import base64
import binascii
import logging

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from registry.hubs.staging import Staging
from registry.hubs.store import BRANCH, Commit, EntryNotFound, ParentMismatch, RevisionNotFound
from registry.nesting import loads_json
from server import access, body_stream, indexing
from server.accounts import Identity
from server.commit_body import LFS_SIZE, CommitOps, parse_commit
from server.errors import HubHTTPError
from server.gitignore import GitIgnore
from server.hf_common import (
    SMALL_BODY,
    raw_rest,
    read_limited,
    repo_id_of,
    resolve,
    revision_not_found,
    store_lookups,
    valid_path,
)
from server.state import ServerState
from w2w.errors import HubError, W2WError

log = logging.getLogger("w2wreg.serve")


def branch_of(state: ServerState, repo_id: str, revision: str) -> str:
    """The branch a commit names; 404 RevisionNotFound for a tag, a commit or a missing branch."""
    with store_lookups(repo_id):
        return state.store.branch_of(repo_id, revision)


def _gitignore_of(state: ServerState, head: Commit, sent: object) -> GitIgnore | None:
    """The .gitignore a preupload applies: the one the client sent (the commit's own), else the branch's."""
    if isinstance(sent, str):
        return GitIgnore(sent)
    entry = head.files.get(".gitignore")
    return GitIgnore(state.store.read(entry).decode("utf-8", "replace")) if entry else None


def _lfs_rules_of(state: ServerState, head: Commit) -> GitIgnore | None:
    """The patterns the branch's .gitattributes sends through LFS (`filter=lfs`), as a matcher."""
    entry = head.files.get(".gitattributes")
    if entry is None or entry.size > SMALL_BODY:
        return None
    lines = state.store.read(entry).decode("utf-8", "replace").splitlines()
    return GitIgnore("\n".join(ln.split()[0] for ln in lines if "filter=lfs" in ln.split()[1:]))


def upload_mode(path: str, size: object, sample: object, lfs_rules: GitIgnore | None) -> str:
    """'lfs' where the Hub would answer it: a file of 10 MB or more, one the .gitattributes sends through
    LFS, or binary content (a NUL byte in the sample); else 'regular' (base64 in the commit)."""
    if isinstance(size, int) and size >= LFS_SIZE:
        return "lfs"
    if lfs_rules is not None and lfs_rules.ignores(path):
        return "lfs"
    try:
        binary = isinstance(sample, str) and b"\0" in base64.b64decode(sample, validate=True)
    except (binascii.Error, ValueError):
        binary = False
    return "lfs" if binary else "regular"


def _no_pr(request: Request) -> None:
    if request.query_params.get("create_pr") not in (None, "", "0", "false", "False"):
        raise HubHTTPError(400, "this hub does not take pull requests: commit to a branch (create_pr=False)")


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.post("/api/models/{ns}/{name}/preupload/{revision:path}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id = repo_id_of(ns, name)
        access.require_repo_write(state, access.identity(state, request), request, repo_id)
        _no_pr(request)
        branch = branch_of(state, repo_id, revision)
        head = await run_in_threadpool(resolve, state, repo_id, f"refs/heads/{branch}")
        try:
            body = loads_json(await read_limited(request, state.max_upload), "the body")
            files = body["files"]
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HubHTTPError(400, "the body must be JSON: {files: [{path, size, sample}], gitIgnore}") from None
        ignore = await run_in_threadpool(_gitignore_of, state, head, body.get("gitIgnore"))
        lfs_rules = await run_in_threadpool(_lfs_rules_of, state, head) if state.lfs else None
        out = []
        for f in files:
            path = valid_path(str(f.get("path", "")))
            size = f.get("size")
            if isinstance(size, int) and size > state.max_upload:
                raise HubHTTPError(413, f"{path}: {size} bytes is over this hub's limit of {state.max_upload}")
            known = head.files.get(path)
            skip = ignore is not None and ignore.ignores(path)
            mode = upload_mode(path, size, f.get("sample"), lfs_rules) if state.lfs else "regular"
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": skip, "oid": known.oid if known else None})
        return {"files": out, "commitOid": head.oid}

    @r.post("/api/models/{ns}/{name}/commit/{revision:path}")
    async def commit(ns: str, name: str, revision: str, request: Request):
        revision = raw_rest(request, 5)  # as sent: see hf_common.raw_tail
        repo_id = repo_id_of(ns, name)
        who = access.identity(state, request)
        access.require_repo_write(state, who, request, repo_id)
        _no_pr(request)
        branch = branch_of(state, repo_id, revision)
        base = str(request.base_url).rstrip("/")
        staging = Staging(state.store)
        try:
            # parsed as it arrives: file contents go to the staging, not to memory (server.commit_body)
            ops = await body_stream.in_thread(
                request, lambda batches: parse_commit(batches, staging, state.max_upload), body_limit(state.max_upload)
            )
            return await run_in_threadpool(_commit, state, repo_id, branch, ops, staging, who, base)
        finally:
            await run_in_threadpool(staging.discard)  # what was not published: a refused commit leaves nothing

    return r


def body_limit(max_upload: int) -> int:
    """The largest commit body: its files' decoded content is at most `max_upload` (server.commit_body), and
    base64 makes 4 characters of 3 bytes; the rest is the JSON of each operation."""
    return max_upload * 3 // 2 + (16 << 20)


def _commit(
    state: ServerState, repo_id: str, branch: str, ops: CommitOps, staging: Staging, who: Identity, base_url: str
) -> dict:
    user = who.name or ""
    header, added, lfs, deleted, deleted_folders = ops.header, ops.added, ops.lfs, ops.deleted, ops.deleted_folders
    for p, (oid, size) in lfs.items():
        if not state.store.repo_has_lfs(repo_id, oid, size):
            raise HubHTTPError(400, f"{p}: the LFS object {oid} was not uploaded to {repo_id} (batch API first)")
    try:
        lfs_entries = {p: state.store.lfs_entry(oid, size) for p, (oid, size) in lfs.items()}
    except HubError as e:  # an lfsFile whose object is not whole
        raise HubHTTPError(400, str(e)) from None
    head = resolve(state, repo_id, f"refs/heads/{branch}")
    # Check the LoRA the commit would leave at the head of main before anything is written: a push that
    # cannot be indexed is refused whole. Other branches are not indexed, so not checked.
    indexed = branch == BRANCH or state.index_branches
    kept = {p for p in head.files if p not in deleted and not any(p.startswith(f + "/") for f in deleted_folders)}
    lora = indexing.lora_path(kept | set(added) | set(lfs_entries))
    brings_lora = indexed and lora is not None and (lora in added or lora in lfs_entries)  # else: left as it was
    # a new card over the same LoRA: the model takes the card's attributes
    new_card = indexed and not brings_lora and lora is not None and ("README.md" in added or "README.md" in deleted)
    if brings_lora:
        cfg_path = (lora.rsplit("/", 1)[0] + "/" if "/" in lora else "") + "adapter_config.json"
        cfg_entry = added.get(cfg_path) or head.files.get(cfg_path)
        cfg = staging.read(cfg_entry) if cfg_entry else None
        data = staging.read(added.get(lora) or lfs_entries[lora])
        try:
            indexing.read_lora_bytes(lora, data, cfg)
        except W2WError as e:
            raise HubHTTPError(422, str(e)) from None
    entries = added | lfs_entries
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
            branch=branch,
            staged=staging,  # published (one flush) only once the commit is known to be good
        )
    except ParentMismatch as e:
        raise HubHTTPError(412, str(e)) from None
    except EntryNotFound as e:
        raise HubHTTPError(404, str(e), "EntryNotFound") from None
    except RevisionNotFound as e:  # the branch was deleted meanwhile
        raise revision_not_found(str(e)) from None
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None
    log.info("%s committed %s to %s@%s (%d files)", user, commit.oid[:12], repo_id, branch, len(entries))
    out = {"commitUrl": f"{base_url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "pullRequestUrl": None}
    if brings_lora or new_card:
        with state.lock:
            try:
                if brings_lora:
                    result = indexing.index_commit(state.registry, state.store, repo_id, commit)
                else:
                    result = indexing.update_card(state.registry, state.store, repo_id, commit)
            except W2WError as e:  # the commit stands; the next start's catch-up retries
                log.error("%s@%s: indexing failed: %s", repo_id, commit.oid[:12], e)
                result = indexing.IndexResult(error=str(e))
            if result is not None:
                # "duplicate of X": not the name of a model the pusher may not read
                v = access.ModelView(state, who)
                out["w2w"] = {k: v.redact(x) if isinstance(x, str) else x for k, x in result.to_json().items()}
    return out
