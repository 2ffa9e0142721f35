"""ASGI middleware: every response carries an `X-Request-Id` (the client's, when it sent a sane one), which
the Hub's client quotes in its errors and which the server's log lines can be matched on."""

from __future__ import annotations

import re
import uuid

_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestId:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), b"")
        rid = given if _SANE.fullmatch(given) else uuid.uuid4().hex.encode()

        async def with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        return await self.app(scope, receive, with_id)
