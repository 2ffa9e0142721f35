"""A versioned repo store, git's design in miniature: the storage behind `w2wreg serve`.

    <root>/objects/ab/ab12...        file contents, named by their sha256 (shared by every repo)
    <root>/repos/NS/NAME/repo.json   {"private": ..., "created": ...}
    <root>/repos/NS/NAME/commits/OID.json   one commit: parent, message, time, {path: file entry}
    <root>/repos/NS/NAME/refs/main   the branch head: a commit oid

A commit writes its new objects, then the commit file, then moves the ref, each by an atomic rename,
under the repo's lock: a commit interrupted anywhere leaves the ref on the previous revision, and what
it had written is unreferenced garbage, never a half-visible revision. Commit oids are 40 hex digits
(sha1 of the commit record), file oids are git blob ids, as the Hugging Face Hub reports them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from registry.hubs import validate_repo_id
from w2w.errors import HubError
from w2w.formats.tensorfile import atomic_write_bytes

BRANCH = "main"
MAX_PATH = 1000
_OID = re.compile(r"^[0-9a-f]{7,40}$")
# control characters (C0, DEL, C1, Unicode's line/paragraph separators), lone surrogates (no UTF-8 for
# them), and what Windows refuses in file names
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\:*?\"<>|]")


class RepoNotFound(HubError, LookupError):
    pass


class RevisionNotFound(HubError, LookupError):
    pass


class ParentMismatch(HubError):
    pass


def validate_path(path: str) -> str:
    """A file path inside a repo: relative, '/'-separated, no '.', '..' or empty parts, no control
    characters, and no `.git` part at any depth (a clone of the repo must not get hooks or config)."""
    parts = path.split("/")
    if (
        not path
        or len(path) > MAX_PATH
        or path.startswith("/")
        or _BAD_CHARS.search(path)
        or any(p in ("", ".", "..") for p in parts)
        or any(p.lower() == ".git" for p in parts)  # lower: case-insensitive file systems
    ):
        raise HubError(f"{path!r} is not a valid file path inside a repo")
    return path


def _valid_id(repo_id: str) -> bool:
    """Whether a folder name is a repo id (folders from before the id rules were strict are left out)."""
    try:
        validate_repo_id(repo_id)
    except HubError:
        return False
    return True


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    oid: str  # git blob id: what the Hub calls a regular file's oid
    size: int


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    created: float
    files: dict[str, FileEntry] = field(default_factory=dict)
    author: str = ""

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        return cls(**{**d, "files": {p: FileEntry(**e) for p, e in d["files"].items()}})

    def to_json(self) -> dict:
        return asdict(self)


class RepoStore:
    """Model repos with history. Thread- and process-safe for commits (one writer per repo at a time)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- layout ------------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Path:
        return self.root / "repos" / validate_repo_id(repo_id)

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def exists(self, repo_id: str) -> bool:
        return (self._repo(repo_id) / "repo.json").exists()

    def meta(self, repo_id: str) -> dict:
        try:
            return json.loads((self._repo(repo_id) / "repo.json").read_text())
        except FileNotFoundError:
            raise RepoNotFound(f"no repo {repo_id!r} on this hub") from None

    def list_repos(self) -> list[str]:
        base = self.root / "repos"
        if not base.exists():
            return []
        found = (f"{ns.name}/{r.name}" for ns in base.iterdir() if ns.is_dir() for r in ns.iterdir())
        return sorted(r for r in found if _valid_id(r) and (base / r / "repo.json").exists())

    # --- locking -----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, repo_id: str):
        """Serializes commits to one repo across threads (a lock per repo) and processes (a lock file)."""
        with self._locks_guard:
            t = self._locks.setdefault(repo_id, threading.Lock())
        path = self._repo(repo_id).with_name(self._repo(repo_id).name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with t, FileLock(str(path)):
            yield

    # --- reading -----------------------------------------------------------------------------------

    def _read_commit(self, repo_id: str, oid: str) -> Commit:
        try:
            return Commit.from_json(json.loads((self._repo(repo_id) / "commits" / f"{oid}.json").read_text()))
        except FileNotFoundError:
            raise RevisionNotFound(f"no revision {oid!r} in repo {repo_id!r}") from None

    def head(self, repo_id: str, branch: str = BRANCH) -> str | None:
        try:
            return (self._repo(repo_id) / "refs" / branch).read_text().strip()
        except FileNotFoundError:
            return None

    def resolve(self, repo_id: str, revision: str | None = None) -> Commit:
        """The commit a revision names: a branch (only `main`), a full commit oid, or a unique prefix of >= 7."""
        self.meta(repo_id)
        revision = revision or BRANCH
        if revision == BRANCH:
            oid = self.head(repo_id)
            if oid is None:
                raise RevisionNotFound(f"repo {repo_id!r} has no commit yet")
            return self._read_commit(repo_id, oid)
        if not _OID.fullmatch(revision):  # fullmatch: "$" would let a trailing newline through
            raise RevisionNotFound(f"no revision {revision!r} in repo {repo_id!r} (branches: {BRANCH})")
        commits = self._repo(repo_id) / "commits"
        found = [p.stem for p in commits.glob(f"{revision}*.json")] if commits.exists() else []
        if len(found) != 1:
            why = "is ambiguous" if found else "does not exist"
            raise RevisionNotFound(f"revision {revision!r} {why} in repo {repo_id!r}")
        return self._read_commit(repo_id, found[0])

    def history(self, repo_id: str) -> list[Commit]:
        """Commits of `main`, newest first."""
        out, oid = [], self.head(repo_id)
        while oid:
            c = self._read_commit(repo_id, oid)
            out.append(c)
            oid = c.parent
        return out

    def read(self, entry: FileEntry) -> bytes:
        return self.object_path(entry.sha256).read_bytes()

    def check(self) -> list[tuple[str, str]]:
        """(what, problem) for every repo whose head or history is unreadable, and every file of every
        commit whose object is missing or no longer has its sha256. Reads every object once."""
        problems: list[tuple[str, str]] = []
        checked: dict[str, bool] = {}
        for repo_id in self.list_repos():
            try:
                commits = self.history(repo_id)
            except (RevisionNotFound, ValueError, TypeError, KeyError) as e:
                problems.append((f"repo {repo_id}", f"its history cannot be read ({e})"))
                continue
            if not commits:
                problems.append((f"repo {repo_id}", "has no head commit"))
            for c in commits:
                for path, e in c.files.items():
                    if e.sha256 not in checked:
                        try:
                            data = self.object_path(e.sha256).read_bytes()
                            checked[e.sha256] = hashlib.sha256(data).hexdigest() == e.sha256
                        except FileNotFoundError:
                            checked[e.sha256] = False
                    if not checked[e.sha256]:
                        problems.append((f"repo {repo_id}@{c.oid[:12]}/{path}", "content missing or damaged (sha256)"))
        return problems

    # --- writing -----------------------------------------------------------------------------------

    def create(self, repo_id: str, private: bool = False) -> bool:
        """Create an empty repo with an initial commit; False when it already exists."""
        with self.lock(repo_id):
            if self.exists(repo_id):
                return False
            repo = self._repo(repo_id)
            first = self._write_commit(repo_id, None, {}, "initial commit", "")
            atomic_write_bytes(repo / "refs" / BRANCH, first.oid.encode())
            # repo.json last: a repo exists only once it has a branch to read
            atomic_write_bytes(repo / "repo.json", json.dumps({"private": private, "created": time.time()}).encode())
            return True

    def put_object(self, data: bytes) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data)
        return FileEntry(sha, git_blob_oid(data), len(data))

    def _write_commit(
        self, repo_id: str, parent: str | None, files: dict, message: str, description: str, author: str = ""
    ) -> Commit:
        record = {"parent": parent, "message": message, "description": description, "created": time.time(),
                  "author": author, "files": {p: asdict(e) for p, e in sorted(files.items())}}  # fmt: skip
        oid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        commit = Commit(oid=oid, **{**record, "files": dict(sorted(files.items()))})
        atomic_write_bytes(self._repo(repo_id) / "commits" / f"{oid}.json", json.dumps(commit.to_json()).encode())
        return commit

    def commit(
        self,
        repo_id: str,
        added: dict[str, FileEntry],
        deleted: list[str] = (),
        deleted_folders: list[str] = (),
        message: str = "",
        description: str = "",
        parent: str | None = None,
        author: str = "",
    ) -> Commit:
        """A new commit on `main`: the head's files, less the deleted ones, plus the added entries (whose
        objects must be stored already, see put_object). `parent`, when given, must be the head."""
        for p in [*added, *deleted, *deleted_folders]:
            validate_path(p)
        with self.lock(repo_id):
            head = self.resolve(repo_id)
            if parent is not None and not head.oid.startswith(parent):
                raise ParentMismatch(f"the head of {repo_id!r} is {head.oid}, not {parent}: fetch and retry")
            files = dict(head.files)
            for p in deleted:
                if files.pop(p, None) is None:
                    raise HubError(f"cannot delete {p!r}: no such file in {repo_id!r}")
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            for p, e in added.items():
                if not self.object_path(e.sha256).exists():
                    raise HubError(f"{p!r}: its content was not uploaded")
                files[p] = e
            commit = self._write_commit(repo_id, head.oid, files, message, description, author)
            atomic_write_bytes(self._repo(repo_id) / "refs" / BRANCH, commit.oid.encode())
            return commit
