"""What every route of the server shares: the registry, the repo store, the tokens, the limits."""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from registry.hubs.store import RepoStore
from registry.registry import Registry
from w2w.errors import W2WError

DEFAULT_MAX_UPLOAD = 1 << 30  # 1 GiB per request: a LoRA is megabytes; a base model does not belong here


class TokenFileError(W2WError):
    pass


def read_tokens_file(path: Path) -> dict[str, str]:
    """`NAME TOKEN` or `TOKEN` per line (# comments); returns token -> user name."""
    out = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise TokenFileError(f"{path}: cannot read the tokens file ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise TokenFileError(f"{path}:{n}: expected 'NAME TOKEN' or 'TOKEN', got {len(parts)} fields")
        name, token = parts if len(parts) == 2 else ("w2wreg", parts[0])
        if len(token) < 8:
            raise TokenFileError(f"{path}:{n}: a token must have at least 8 characters")
        out[token] = name
    if not out:
        raise TokenFileError(f"{path}: no token in the file")
    return out


def new_token() -> str:
    return "w2w_" + secrets.token_urlsafe(24)


@dataclass
class ServerState:
    registry: Registry
    tokens: dict[str, str]  # token -> user name
    private: bool = False
    max_upload: int = DEFAULT_MAX_UPLOAD
    store: RepoStore = field(init=False)
    # The catalog's caches and DuckDB connections are not made for concurrent threads: registry work is
    # serialized (a team hub's requests are short; downloads of repo files do not take this lock).
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self):
        self.store = RepoStore(self.registry.paths.repos)

    def user(self, token: str | None) -> str | None:
        """The user a bearer token belongs to, or None (compared in constant time)."""
        if not token:
            return None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return name
        return None
