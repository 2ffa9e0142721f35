"""How the server hands out what users uploaded, and the headers that keep it from running as the page.

Uploaded files are served under the page's origin, so none may ever be a document of that origin:
every response carries `X-Content-Type-Options: nosniff`; a repo file is sent as one of a few types a
browser never runs (JSON, plain text) or else as `application/octet-stream` in an attachment, and with
`Content-Security-Policy: sandbox` in any case (opened anyway, it has an opaque origin: no cookies, no
storage, no requests as the page). The page itself has a strict policy: only its own script and style
(by hash), requests to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib
import re

# extensions served inline: types a browser shows as text and never executes
SAFE_INLINE = {
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".yml": "text/plain; charset=utf-8",
    ".csv": "text/plain; charset=utf-8",
}
USER_CONTENT_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# what every other response gets (JSON of the APIs): no document of ours may be framed or run anything
API_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
    "Referrer-Policy": "no-referrer",
}


def download_type(path: str) -> tuple[str, str]:
    """(media type, Content-Disposition type) for a repo file."""
    name = path.rsplit("/", 1)[-1].lower()
    ext = name[name.rfind(".") :] if "." in name else ""
    if ext in SAFE_INLINE:
        return SAFE_INLINE[ext], "inline"
    return "application/octet-stream", "attachment"


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def page_policy(html: str) -> str:
    """The page's Content-Security-Policy: its inline <script> and <style> blocks by hash, nothing else."""
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_hash(s) for s in scripts),
            "style-src " + " ".join(_hash(s) for s in styles),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """ASGI middleware: every response gets API_HEADERS where the route did not set its own (the page and
    repo files set theirs). `exempt` paths (the Swagger UI, which loads its script from a CDN) get nosniff
    only."""

    def __init__(self, app, exempt: tuple[str, ...] = ()):
        self.app, self.exempt = app, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = API_HEADERS
        if scope.get("path") in self.exempt:
            extra = {"X-Content-Type-Options": "nosniff"}
        wanted = [(k.lower().encode(), v.encode()) for k, v in extra.items()]

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *(h for h in wanted if h[0] not in have)],
                }
            await send(message)

        return await self.app(scope, receive, with_headers)
