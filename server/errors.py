"""The Hub protocol's error: a status, a message, and the `X-Error-Code` the huggingface_hub client reads."""

from __future__ import annotations

from fastapi.responses import JSONResponse

AUTH_ERROR = "Invalid credentials in Authorization header"  # the client's wording: not a missing repo


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_response(e: HubHTTPError) -> JSONResponse:
    headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode()[:1000]}
    if e.code:
        headers["X-Error-Code"] = e.code
    return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)


def repo_not_found(repo_id: str, status: int = 404) -> HubHTTPError:
    """The one answer for a repo that is missing or that the caller may not read: the two look the same."""
    return HubHTTPError(status, f"Repository {repo_id} not found", "RepoNotFound")
