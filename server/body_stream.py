"""A request body handed to a worker thread as it arrives, in batches, with a limit on its size.

The event loop reads the body ahead (at most AHEAD batches of about BATCH bytes held) while a worker thread
works on what came (parses, decodes, hashes, writes): one thread hop per batch instead of one per network
chunk, the two sides overlap, and the memory held does not grow with the body. When the work fails
part-way (a bad line, a file over the limit), the rest of the body is read and dropped before the error
is answered, so the client, still sending, gets the answer instead of a broken connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio.from_thread
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.errors import HubHTTPError

T = TypeVar("T")
BATCH = 1 << 20
AHEAD = 4
_END = object()


def too_large(limit: int) -> HubHTTPError:
    return HubHTTPError(413, f"the request is over this hub's limit of {limit} bytes (w2wreg serve --max-upload-mb)")


def check_declared(request: Request, limit: int) -> None:
    """413 at once for a body that says (Content-Length) it is over the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HubHTTPError(
            413, f"the request has {declared} bytes; this hub takes at most {limit} (w2wreg serve --max-upload-mb)"
        )


async def in_thread(request: Request, work: Callable[[Iterator[bytes]], T], limit: int) -> T:
    """work(batches) in a worker thread, over the body of `request` (at most `limit` bytes: else 413)."""
    check_declared(request, limit)
    queue: asyncio.Queue = asyncio.Queue(maxsize=AHEAD)
    dropping = False  # the work has stopped: read the rest and drop it

    async def read() -> None:
        parts, held, total = [], 0, 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                if dropping:
                    continue
                parts.append(chunk)
                held += len(chunk)
                if held >= BATCH:
                    await queue.put(b"".join(parts))
                    parts, held = [], 0
            if parts and not dropping:
                await queue.put(b"".join(parts))
            item = _END
        except Exception as e:  # the client hung up, the body is too large: the work sees it
            item = e
        if not dropping:
            await queue.put(item)

    def batches() -> Iterator[bytes]:
        while True:
            item = anyio.from_thread.run(queue.get)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    reader = asyncio.create_task(read())
    try:
        return await run_in_threadpool(work, batches())
    except BaseException:
        dropping = True
        while not queue.empty():  # free a reader waiting for room
            queue.get_nowait()
        await asyncio.wait({reader})
        raise
    finally:
        if not reader.done():
            reader.cancel()
