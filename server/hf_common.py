"""What the Hub-protocol routes share: repo ids, revisions and paths from a request, bodies read with a limit,
and the store's errors turned into the Hub's statuses and `X-Error-Code`s."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import quote, unquote

import anyio
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse

from registry.hubs import validate_repo_id
from registry.hubs.store import Commit, RepoNotFound, RevisionNotFound, validate_path
from registry.nesting import loads_json
from server.errors import HubHTTPError, repo_not_found
from server.state import ServerState
from w2w.errors import HubError

SMALL_BODY = 1 << 20  # create-repo, settings, refs and validate-yaml bodies: kilobytes


PAGE = 1000  # items per page of a listing the client pages through
EXPANDED_PAGE = 50  # ... and of a tree with expand=True, whose entries cost a walk of the history (the Hub's)


def page(
    request: Request, items: list, fill: Callable[[list], object] | None = None, size: int | None = None
) -> JSONResponse:
    """The page of `items` that the request's `cursor` names, with a `Link: <...>; rel="next"` header while
    more follow: how the Hub pages list_models, list_repo_tree and list_repo_commits (the client follows it).
    `fill`, when given, completes the page's items in place (work done for one page only); `size`: items a
    page (PAGE by default)."""
    size = size or PAGE
    cursor = request.query_params.get("cursor", "0")
    if not cursor.isdigit():
        raise HubHTTPError(400, f"cursor must be what a Link header gave, not {cursor!r}")
    start = int(cursor)
    headers = {}
    if start + size < len(items):
        headers["Link"] = f'<{request.url.include_query_params(cursor=start + size)}>; rel="next"'
    if fill is not None:
        fill(items[start : start + size])
    return JSONResponse(items[start : start + size], headers=headers)


class ObjectResponse(FileResponse):
    """A stored file sent as Starlette's FileResponse does (Content-Length, Range, HEAD), in 1 MiB reads
    (its 64 KiB reads cost a thread hop each, which made downloads several times slower than a file copy),
    each read in the event loop when the page cache holds it (_CachedReads: no thread hop at all)."""

    chunk_size = 1 << 20

    @asynccontextmanager
    async def _open_file(self):  # Starlette's hook for the file its handlers read (a no-op if it goes away)
        fd = await anyio.to_thread.run_sync(os.open, self.path, os.O_RDONLY)
        try:
            yield _CachedReads(fd)
        finally:
            os.close(fd)


class _CachedReads:
    """The reads FileResponse makes (seek, read), done in the event loop while the pages are in the page cache
    (Linux's preadv with RWF_NOWAIT fails rather than wait for the disk) and in a worker thread otherwise.
    A download of a cached 2 GB file so makes no thread hop (2,048 of them before, each a wake-up of the loop,
    which on a busy machine cost about what the copy into the socket costs)."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0
        self.nowait = hasattr(os, "RWF_NOWAIT")

    async def seek(self, pos: int) -> None:
        self.pos = pos

    async def read(self, n: int) -> bytes | bytearray:
        data = self._cached(n)
        if data is None:
            data = await anyio.to_thread.run_sync(os.pread, self.fd, n, self.pos)
        self.pos += len(data)
        return data

    def _cached(self, n: int) -> bytes | bytearray | None:
        if not self.nowait:
            return None
        buf = bytearray(n)
        try:
            got = os.preadv(self.fd, [buf], self.pos, os.RWF_NOWAIT)
        except BlockingIOError:  # not all in the page cache
            return None
        except OSError:  # a file system without RWF_NOWAIT: threads from now on
            self.nowait = False
            return None
        if got < n and self.pos + got < os.fstat(self.fd).st_size:
            return None  # a part is cached, not the rest: the whole read in a thread
        # the socket takes any bytes-like object: a full read is sent as read, without a copy into bytes
        return buf if got == n else bytes(memoryview(buf)[:got])


def repo_id_of(ns: str, name: str) -> str:
    repo_id = f"{ns}/{name}"
    try:
        return validate_repo_id(repo_id)
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None


def valid_path(path: str) -> str:
    try:
        return validate_path(path)
    except HubError as e:
        raise HubHTTPError(400, str(e)) from None


def revision_not_found(message: str) -> HubHTTPError:
    return HubHTTPError(404, message, "RevisionNotFound")


@contextmanager
def store_lookups(repo_id: str) -> Iterator[None]:
    """The store's lookup errors as the Hub's: 404 RepositoryNotFound, 404 RevisionNotFound."""
    try:
        yield
    except RepoNotFound:
        raise repo_not_found(repo_id) from None
    except RevisionNotFound as e:
        raise revision_not_found(str(e)) from None


def resolve(state: ServerState, repo_id: str, revision: str | None) -> Commit:
    """The commit a revision names (branch, tag, `refs/heads/..`, `refs/tags/..`, commit oid)."""
    with store_lookups(repo_id):
        return state.store.resolve(repo_id, revision)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def raw_tail(request: Request, skip: int) -> list[str]:
    """The path segments after the first `skip`, each percent-decoded on its own.

    The client quotes a revision with safe="" (`refs%2Fheads%2Fmain`): the decoded path would make that
    three segments, and a `{x:path}` pattern would drop a trailing newline (its `$`), so revisions and file
    paths are taken from the path as it was sent.
    """
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(request.url.path)
    return [unquote(s) for s in path.lstrip("/").split("/")[skip:]]


def raw_rest(request: Request, skip: int) -> str:
    """Everything after the first `skip` segments, decoded: a revision or branch that ends the path."""
    return "/".join(raw_tail(request, skip))


def revision_and_path(request: Request, skip: int) -> tuple[str, str]:
    """(revision, path in repo) of `.../{revision}/{path}` after `skip` segments, as the client sent them."""
    parts = raw_tail(request, skip)
    return parts[0], "/".join(parts[1:])


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


async def json_object(request: Request, what: str) -> dict:
    """A small JSON object body (an empty body is {}); 400 naming the fields expected otherwise."""
    try:
        body = loads_json(await read_limited(request, SMALL_BODY) or b"{}", "the body")
    except ValueError as e:
        raise HubHTTPError(400, f"the body must be JSON: {what} ({e})") from None
    if not isinstance(body, dict):
        raise HubHTTPError(400, f"the body must be a JSON object: {what}")
    return body
