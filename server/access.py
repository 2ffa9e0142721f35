"""The one rule of who may read and write what on `w2wreg serve`; every route asks here.

Repos: a user writes the namespace of their own name and those of their organizations (the operator
writes every one). A private repo is read only by those who may write it; on a --private server nothing
is read without a token. A repo the caller may not read looks missing.

Models of the registry: a model pushed here is readable exactly when its repo is (after the repo is
deleted: as the repo was, by the same people); any other model (an
edit, a mix, anything derived) when every parent it is linked to is, so an edit of a private model stays
as private as its parent. Models registered outside any push and without parents are as open as a public
repo.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from fastapi import Request

from registry.catalog import ModelRow
from registry.hubs.store import RepoNotFound
from server.accounts import Identity
from server.errors import AUTH_ERROR, HubHTTPError, repo_not_found
from server.indexing import DELETED_PREFIX, DELETED_PRIVATE_PREFIX, SOURCE_PREFIX
from server.state import ServerState
from w2w.errors import HubError, UnknownModelError, W2WError


class HiddenLookupError(W2WError, LookupError):
    """A lookup error whose message named a hidden model (a 404 as before)."""


# --- the rule ---------------------------------------------------------------------------------------


def may_write(who: Identity, repo_id: str) -> bool:
    """Whether `who` may write `repo_id` (a NAMESPACE/NAME), whether or not it exists."""
    return who.operator or repo_id.split("/", 1)[0] in who.namespaces


def may_read(who: Identity, repo_id: str, repo_private: bool, server_private: bool) -> bool:
    """Whether `who` may read `repo_id`, a private repo or not, on a private server or not."""
    if server_private and not who.authenticated:
        return False
    return not repo_private or may_write(who, repo_id)


# --- the rule applied to a request --------------------------------------------------------------------


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def identity(state: ServerState, request: Request) -> Identity:
    return state.accounts.identify(bearer(request))


def require_server_read(state: ServerState, who: Identity) -> None:
    """Anything at all may be read: on a --private server, only with a valid token."""
    if state.private and not who.authenticated:
        raise HubHTTPError(401, f"{AUTH_ERROR}: this hub is private")


def require_user(who: Identity, request: Request) -> str:
    """A write needs a valid token: the user's name."""
    if not who.authenticated:
        why = "a valid token is required to write" if bearer(request) else "writes need a bearer token"
        raise HubHTTPError(401, f"{AUTH_ERROR}: {why} (HF_TOKEN, or token= in huggingface_hub)")
    return who.name  # type: ignore[return-value]


def repo_private(state: ServerState, repo_id: str) -> bool:
    """A repo's private flag; a missing repo counts as private (whoever may not read it sees 'not found')."""
    try:
        return bool(state.store.meta(repo_id).get("private"))
    except (RepoNotFound, HubError):
        return True


def can_read_repo(state: ServerState, who: Identity, repo_id: str) -> bool:
    return may_read(who, repo_id, repo_private(state, repo_id), state.private)


def require_repo_read(state: ServerState, who: Identity, repo_id: str) -> None:
    """A repo the caller may not read, or a missing one: 'not found' (401 without a token, as the Hub)."""
    if not can_read_repo(state, who, repo_id):
        raise repo_not_found(repo_id, 401 if not who.authenticated else 404)


def require_repo_write(state: ServerState, who: Identity, request: Request, repo_id: str) -> str:
    """The user's name when they may write `repo_id`; 401 without a token, 403 for a repo they may read
    but not write, 404 for one they may not read (a private repo of others looks missing)."""
    user = require_user(who, request)
    if may_write(who, repo_id):
        return user
    if can_read_repo(state, who, repo_id):
        raise HubHTTPError(
            403, f"{user} may not write to {repo_id}: its namespace is not theirs or their organization's"
        )
    raise repo_not_found(repo_id)


def require_namespace_write(who: Identity, request: Request, namespace: str) -> str:
    user = require_user(who, request)
    if not may_write(who, f"{namespace}/x"):
        raise HubHTTPError(
            403, f"{user} may not create repos under {namespace!r}: only under their own name or their organizations"
        )
    return user


# --- models of the registry ---------------------------------------------------------------------------


def repo_of_source(source: str | None) -> str | None:
    """The repo of this hub a model was pushed to (from its source `hub:serve/NS/NAME@OID`), if any."""
    if source and source.startswith(SOURCE_PREFIX):
        return source[len(SOURCE_PREFIX) :].split("@")[0]
    return None


def deleted_repo_of_source(source: str | None) -> tuple[str, bool] | None:
    """(repo, was private) of a model whose repo of this hub was deleted, if it is one."""
    for prefix, private in ((DELETED_PRIVATE_PREFIX, True), (DELETED_PREFIX, False)):
        if source and source.startswith(prefix):
            return source[len(prefix) :].split("@")[0], private
    return None


class ModelView:
    """The models of the registry as one identity may see them. Build one per request, under state.lock."""

    def __init__(self, state: ServerState, who: Identity):
        self.state, self.who = state, who
        self.hidden: frozenset[int] = frozenset() if who.operator else self._hidden()

    def _hidden(self) -> frozenset[int]:
        sources, parents, _ = _model_graph(self.state)
        repos: dict[str, bool] = {}

        def repo_ok(repo_id: str) -> bool:
            if repo_id not in repos:
                repos[repo_id] = can_read_repo(self.state, self.who, repo_id)
            return repos[repo_id]

        verdict: dict[int, bool] = {}  # model id -> readable

        def readable(model_id: int) -> bool:
            # iterative: lineage chains may be long; a cycle (never made by the registry) reads as hidden
            stack, on_path = [model_id], set()
            while stack:
                m = stack[-1]
                if m in verdict:
                    stack.pop()
                    continue
                gone = deleted_repo_of_source(sources.get(m))
                if gone is not None:  # as readable as its repo was when it was deleted
                    verdict[m] = may_read(self.who, gone[0], gone[1], self.state.private)
                    stack.pop()
                    continue
                repo = repo_of_source(sources.get(m))
                if repo is not None or m not in sources:
                    verdict[m] = repo is not None and repo_ok(repo)
                    stack.pop()
                    continue
                todo = [p for p in parents.get(m, ()) if p not in verdict]
                if not todo:
                    verdict[m] = all(verdict[p] for p in parents.get(m, ()))
                    stack.pop()
                elif m in on_path:
                    verdict[m] = False
                    stack.pop()
                else:
                    on_path.add(m)
                    stack.extend(todo)
            return verdict[model_id]

        return frozenset(m for m in sources if not readable(m))

    def can_read(self, model_id: int) -> bool:
        return model_id not in self.hidden

    @contextmanager
    def redacting(self) -> Iterator[None]:
        """Registry errors raised inside, with hidden models' names taken out (e.g. 'same weights as X')."""
        try:
            yield
        except W2WError as e:
            text = self.redact(str(e))
            if text == str(e):
                raise
            raise (HiddenLookupError if isinstance(e, LookupError) else W2WError)(text) from None

    def only(self, models: Iterable[ModelRow]) -> list[ModelRow]:
        return [m for m in models if m.id not in self.hidden]

    def redact(self, text: str) -> str:
        """`text` (an error of the registry) with the name of every hidden model in it replaced."""
        if not self.hidden:
            return text
        names = _model_graph(self.state)[2]
        for model_id in self.hidden:
            name = names.get(model_id)
            if name and name in text:
                text = text.replace(repr(name), "another model").replace(name, "another model")
        return text

    def get(self, ref: str | int) -> ModelRow:
        """A model by name or id; a hidden model is as missing as an unknown one (and no near names are
        suggested: they could be hidden ones)."""
        try:
            m = self.state.registry.get(ref)
        except UnknownModelError:
            raise UnknownModelError(ref, None) from None
        if m.id in self.hidden:
            raise UnknownModelError(ref, None)
        return m


def _model_graph(state: ServerState) -> tuple[dict[int, str | None], dict[int, list[int]], dict[int, str]]:
    """(model id -> source, child id -> linked parent ids, model id -> name), cached until the catalog changes."""
    catalog = state.registry.catalog
    version = catalog.version()
    cached = state.cache.get("model_graph")
    if cached is not None and cached[0] == version:
        return cached[1]
    with catalog.connect() as con:
        rows = con.execute("SELECT id, source, name FROM models").fetchall()
        sources = {i: src for i, src, _ in rows}
        names = {i: name for i, _, name in rows}
        parents: dict[int, list[int]] = {}
        for child, parent in con.execute(
            "SELECT child_id, parent_id FROM lineage WHERE parent_id IS NOT NULL"
        ).fetchall():
            parents.setdefault(child, []).append(parent)
    state.cache["model_graph"] = (version, (sources, parents, names))
    return sources, parents, names
