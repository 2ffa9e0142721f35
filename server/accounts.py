"""Who a request is: tokens -> users, users -> organizations (the tokens file of `w2wreg serve`).

The file, one entry a line (# comments):

    alice  w2w_token_of_alice          a user and one of their tokens (a user may have several lines)
    @team  alice bob                   an organization and its members (several lines add up)
    w2w_operator_token                 a bare token: the operator, who may read and write every repo

A bare token is what the file held before users had namespaces (and what --token gives): it keeps a
single-operator server working as it did. Names follow the Hub's namespace rules.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from w2w.errors import W2WError

OPERATOR = "w2wreg"  # the user name of a bare token
MIN_TOKEN = 8
NAMESPACE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


class TokenFileError(W2WError):
    pass


@dataclass(frozen=True)
class Identity:
    """A request's caller: a user with their organizations, the operator, or anonymous (name None)."""

    name: str | None
    orgs: frozenset[str] = frozenset()
    operator: bool = False

    @property
    def authenticated(self) -> bool:
        return self.name is not None

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces this identity writes (the operator writes all of them: see access)."""
        return frozenset({self.name, *self.orgs}) if self.name else frozenset()


ANONYMOUS = Identity(None)


def valid_namespace(name: str) -> bool:
    return bool(NAMESPACE.fullmatch(name)) and "--" not in name and ".." not in name


@dataclass
class Accounts:
    """token -> user name, user name -> organizations; `identify` turns a bearer token into an Identity."""

    tokens: dict[str, str] = field(default_factory=dict)
    orgs: dict[str, set[str]] = field(default_factory=dict)  # org -> members
    operators: set[str] = field(default_factory=set)  # tokens with every right

    @classmethod
    def of(cls, tokens: Accounts | dict[str, str]) -> Accounts:
        """An Accounts as given, or from {token: user name} (users without organizations)."""
        return tokens if isinstance(tokens, Accounts) else cls(tokens=dict(tokens))

    def add_operator(self, token: str) -> None:
        self.tokens[token] = OPERATOR
        self.operators.add(token)

    def merge(self, other: Accounts) -> Accounts:
        for org, members in other.orgs.items():
            self.orgs.setdefault(org, set()).update(members)
        self.tokens |= other.tokens
        self.operators |= other.operators
        return self

    def orgs_of(self, user: str) -> frozenset[str]:
        return frozenset(org for org, members in self.orgs.items() if user in members)

    def identify(self, token: str | None) -> Identity:
        """The identity of a bearer token; ANONYMOUS for none or an unknown one (compared in constant time)."""
        if not token:
            return ANONYMOUS
        found = None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = known, name  # no early exit: the time does not tell which token matched
        if found is None:
            return ANONYMOUS
        known, name = found
        if known in self.operators:
            return Identity(name, operator=True)
        return Identity(name, self.orgs_of(name))


def read_tokens_file(path: Path) -> Accounts:
    """Parse the tokens file (see the module docstring); a TokenFileError names the line."""
    out = Accounts()
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"{path}: cannot read the tokens file ({getattr(e, 'strerror', None) or e})") from None
    for n, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        where = f"{path}:{n}"
        if parts[0].startswith("@"):
            org, members = parts[0][1:], parts[1:]
            for name in (org, *members):
                if not valid_namespace(name):
                    raise TokenFileError(f"{where}: {name!r} is not a valid user or organization name")
            if not members:
                raise TokenFileError(f"{where}: expected '@ORG MEMBER ...', got no member")
            out.orgs.setdefault(org, set()).update(members)
            continue
        if len(parts) > 2:
            raise TokenFileError(
                f"{where}: expected 'NAME TOKEN', 'TOKEN' or '@ORG MEMBER ...', got {len(parts)} fields"
            )
        token = parts[-1]
        if len(token) < MIN_TOKEN:
            raise TokenFileError(f"{where}: a token must have at least {MIN_TOKEN} characters")
        if token in out.tokens:
            raise TokenFileError(f"{where}: this token is already given on an earlier line")
        if len(parts) == 1:
            out.add_operator(token)
            continue
        if not valid_namespace(parts[0]):
            raise TokenFileError(f"{where}: {parts[0]!r} is not a valid user name (letters, digits, '.', '_', '-')")
        out.tokens[token] = parts[0]
    if not out.tokens:
        raise TokenFileError(f"{path}: no token in the file")
    return out


def new_token() -> str:
    return "w2w_" + secrets.token_urlsafe(24)
