"""What this hub does not serve, answered with what it is instead of a bare 404: datasets, Spaces (and the
client's other repo types), pull requests and discussions, the Hub's catalogue of tags, and git over HTTP.

The 404s carry `X-Error-Code: RepoNotFound` for repo routes, so the client raises RepositoryNotFoundError
(not a connection problem) with this message, and `X-Error-Message` for the rest.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from server.errors import HubHTTPError

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
OTHER_TYPES = ("datasets", "spaces", "kernels")


def build_router() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def other_type(kind: str) -> HubHTTPError:
        return HubHTTPError(404, f"this hub keeps model repos only: no {kind} here", "RepoNotFound")

    for kind in OTHER_TYPES:
        # /api/datasets/..., and /datasets/NS/NAME/resolve/... of hf_hub_download(repo_type="dataset")
        for prefix in (f"/api/{kind}", f"/{kind}/"):

            def refuse(rest: str, kind: str = kind):
                raise other_type(kind)

            r.add_api_route(prefix + "{rest:path}", refuse, methods=METHODS)

    @r.api_route("/api/models/{ns}/{name}/discussions{rest:path}", methods=METHODS)
    def discussions(ns: str, name: str, rest: str):
        raise HubHTTPError(404, "this hub has no pull requests or discussions: commit to a branch instead")

    @r.get("/api/models-tags-by-type")
    def tags_by_type():
        raise HubHTTPError(404, "this hub has no catalogue of tags: list_models(filter=TAG) matches the cards' tags")

    # git's smart HTTP (clone, fetch, push) starts here; git shows a text/plain error body as "remote: ..."
    @r.api_route("/{ns}/{name}/info/refs", methods=["GET"])
    @r.api_route("/{ns}/{name}/git-upload-pack", methods=["POST"])
    @r.api_route("/{ns}/{name}/git-receive-pack", methods=["POST"])
    def git(ns: str, name: str):
        return PlainTextResponse(GIT_REFUSED, status_code=501)

    return r


GIT_REFUSED = (
    "this hub does not speak git over HTTP: use huggingface_hub or the hf CLI "
    "(hf download NS/NAME, hf upload NS/NAME FOLDER) with HF_ENDPOINT set to it\n"
)
