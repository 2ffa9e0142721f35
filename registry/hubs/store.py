"""A versioned repo store, git's design in miniature: the storage behind `w2wreg serve`.

    <root>/objects/ab/ab12...        file contents, named by their sha256 (shared by every repo)
    <root>/repos/NS/NAME/repo.json   {"private": ..., "created": ...}
    <root>/repos/NS/NAME/commits/OID.json   one commit: parent, message, time, {path: file entry}
    <root>/repos/NS/NAME/refs/BRANCH the head of a branch: a commit oid ('/' in a name quoted as %2F)
    <root>/repos/NS/NAME/tags/TAG    the commit a tag names

A commit writes its new objects, then the commit file, then moves the ref, each by an atomic rename,
under the repo's lock: a commit interrupted anywhere leaves the ref on the previous revision, and what
it had written is unreferenced garbage, never a half-visible revision (registry.hubs.gc removes it). Every
write under a repo's lock also holds `<root>/gc.lock` shared; the garbage collector's sweep holds it
exclusively, so it never runs while a commit is between naming its objects and moving its ref. Commit oids
are 40 hex digits (sha1 of the commit record), file oids are git blob ids, as the Hugging Face Hub reports them.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from filelock import FileLock

from registry.hubs import validate_repo_id
from w2w.errors import HubError
from w2w.formats.tensorfile import atomic_write_bytes

if TYPE_CHECKING:
    from registry.hubs.staging import Staging

BRANCH = "main"
GC_LOCK = "gc.lock"
MAX_PATH = 1000
_OID = re.compile(r"^[0-9a-f]{7,40}$")
# control characters (C0, DEL, C1, Unicode's line/paragraph separators), lone surrogates (no UTF-8 for
# them), a backslash (a separator on Windows) and what no Windows folder can hold: * " < > |. The Hub takes
# ':' '?' ',' '%' inside a name (a checkout on Windows cannot have ':' or '?', but Hub repos do).
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\*\"<>|]")


class RepoNotFound(HubError, LookupError):
    pass


class RevisionNotFound(HubError, LookupError):
    pass


class EntryNotFound(HubError, LookupError):
    """A commit deletes a file or folder its branch does not hold."""


class ParentMismatch(HubError):
    pass


class RefExists(HubError):
    pass


class RepoExists(HubError):
    pass


# git's ref-name rules as the Hub applies them, kept to a portable alphabet: parts of [A-Za-z0-9._-]
# separated by '/', none starting with '.' or ending with '.lock', no '..'; at most 200 characters
_REF = re.compile(r"(?!-)[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def validate_ref_name(name: str, what: str = "branch") -> str:
    """A branch or tag name; a HubError that says why not."""
    if (
        not isinstance(name, str)
        or len(name) > 200
        or not _REF.fullmatch(name)
        or ".." in name
        or any(part.endswith((".lock", ".")) for part in name.split("/"))
        or name.startswith("refs/")
        or re.fullmatch(r"[0-9a-f]{40}", name)
    ):
        raise HubError(
            f"{name!r} is not a valid {what} name (letters, digits, '.', '_', '-' and '/' between parts; "
            "no '..', no part starting with '.' or ending with '.lock'; not 'refs/...' nor a commit id)"
        )
    return name


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


def _valid_ref(name: str) -> bool:
    try:
        validate_ref_name(name)
    except HubError:
        return False
    return True


def _valid_id(repo_id: str) -> bool:
    """Whether a folder name is a repo id (folders from before the id rules were strict are left out)."""
    try:
        validate_repo_id(repo_id)
    except HubError:
        return False
    return True


def _libc_syncfs():
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux
        return None


_SYNCFS = _libc_syncfs()


def sync_filesystem(path: Path) -> None:
    """Flush every written file and folder entry of the file system holding `path` (Linux's syncfs: one
    call for all the objects of a commit; elsewhere os.sync)."""
    if _SYNCFS is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    oid: str  # git blob id: of the file, or of its LFS pointer for an LFS file (what the Hub reports)
    size: int
    lfs: bool = False  # uploaded through the Git LFS batch API (the Hub lists it with an `lfs` block)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file a git clone would hold in place of the file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


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
        self._held = threading.local()  # how many repo locks this thread holds (the GC lock is taken once)

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
        with t, FileLock(str(path)), self._gc_shared():
            yield

    @contextmanager
    def _gc_shared(self):
        """The GC lock, shared, once per thread however many repo locks it nests (a second shared request
        could wait behind a waiting exclusive one: a deadlock)."""
        depth = getattr(self._held, "depth", 0)
        self._held.depth = depth + 1
        try:
            if depth:
                yield
            else:
                with self._flock(fcntl.LOCK_SH):
                    yield
        finally:
            self._held.depth = depth

    @contextmanager
    def exclusive(self):
        """No repo is being written while this is held (in this process or another): the GC's sweep."""
        with self._flock(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _flock(self, mode: int):
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / GC_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)  # released when fd is closed
            yield
        finally:
            os.close(fd)

    # --- reading -----------------------------------------------------------------------------------

    def _read_commit(self, repo_id: str, oid: str) -> Commit:
        try:
            return Commit.from_json(json.loads((self._repo(repo_id) / "commits" / f"{oid}.json").read_text()))
        except FileNotFoundError:
            raise RevisionNotFound(f"no revision {oid!r} in repo {repo_id!r}") from None

    def _ref_file(self, repo_id: str, kind: str, name: str) -> Path:
        return self._repo(repo_id) / kind / quote(name, safe="")

    def _read_ref(self, repo_id: str, kind: str, name: str) -> str | None:
        if not _valid_ref(name):  # also keeps '..' and the like from naming a folder
            return None
        try:
            return self._ref_file(repo_id, kind, name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def head(self, repo_id: str, branch: str = BRANCH) -> str | None:
        return self._read_ref(repo_id, "refs", branch)

    def tag(self, repo_id: str, tag: str) -> str | None:
        return self._read_ref(repo_id, "tags", tag)

    def _refs(self, repo_id: str, kind: str) -> dict[str, str]:
        folder = self._repo(repo_id) / kind
        if not folder.is_dir():
            return {}
        return {
            unquote(f.name): f.read_text().strip()
            for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".")  # atomic writes' temp files start with '.'
        }

    def branches(self, repo_id: str) -> dict[str, str]:
        """branch name -> head commit oid."""
        self.meta(repo_id)
        return self._refs(repo_id, "refs")

    def tags(self, repo_id: str) -> dict[str, str]:
        """tag name -> commit oid."""
        self.meta(repo_id)
        return self._refs(repo_id, "tags")

    def branch_of(self, repo_id: str, revision: str | None) -> str:
        """The branch a revision names (`dev` or `refs/heads/dev`): where a commit may go."""
        self.meta(repo_id)
        name = revision or BRANCH
        if name.startswith("refs/heads/"):
            name = name[len("refs/heads/") :]
        if self.head(repo_id, name) is None:
            if self.tag(repo_id, name) is not None or _OID.fullmatch(name):
                raise RevisionNotFound(f"{revision!r} is not a branch of {repo_id!r}: commits go to a branch")
            raise RevisionNotFound(f"no branch {name!r} in repo {repo_id!r}")
        return name

    def resolve(self, repo_id: str, revision: str | None = None) -> Commit:
        """The commit a revision names: a branch (`dev`, `refs/heads/dev`), a tag (`v1`, `refs/tags/v1`),
        a full commit oid, or a unique prefix of >= 7 hex digits (a branch or tag of that name first, as git)."""
        self.meta(repo_id)
        revision = revision or BRANCH
        oid = None
        if revision.startswith("refs/heads/"):
            oid = self.head(repo_id, revision[len("refs/heads/") :])
        elif revision.startswith("refs/tags/"):
            oid = self.tag(repo_id, revision[len("refs/tags/") :])
        else:
            oid = self.head(repo_id, revision) or self.tag(repo_id, revision)
        if oid is not None:
            return self._read_commit(repo_id, oid)
        if not _OID.fullmatch(revision):  # fullmatch: "$" would let a trailing newline through
            raise RevisionNotFound(f"no revision {revision!r} in repo {repo_id!r} (not a branch, tag or commit)")
        commits = self._repo(repo_id) / "commits"
        found = [p.stem for p in commits.glob(f"{revision}*.json")] if commits.exists() else []
        if len(found) != 1:
            why = "is ambiguous" if found else "does not exist"
            raise RevisionNotFound(f"revision {revision!r} {why} in repo {repo_id!r}")
        return self._read_commit(repo_id, found[0])

    def history(self, repo_id: str, revision: str = BRANCH) -> list[Commit]:
        """Commits from `revision` back to the first, newest first."""
        return list(self.walk(repo_id, revision))

    def walk(self, repo_id: str, revision: str = BRANCH) -> Iterator[Commit]:
        """history(), read one commit at a time (a caller that stops early reads no more)."""
        c: Commit | None = self.resolve(repo_id, revision)
        while c is not None:
            yield c
            c = self._read_commit(repo_id, c.parent) if c.parent else None

    def read(self, entry: FileEntry) -> bytes:
        return self.object_path(entry.sha256).read_bytes()

    def check(self) -> list[tuple[str, str]]:
        """(what, problem) for every repo whose head or history is unreadable, and every file of every
        commit whose object is missing or no longer has its sha256. Reads every object once."""
        problems: list[tuple[str, str]] = []
        checked: dict[str, bool] = {}
        for repo_id in self.list_repos():
            commits: dict[str, Commit] = {}
            try:
                if self.head(repo_id) is None:
                    problems.append((f"repo {repo_id}", "has no head commit"))
                for name in [*self.branches(repo_id), *(f"refs/tags/{t}" for t in self.tags(repo_id))]:
                    commits |= {c.oid: c for c in self.history(repo_id, name)}
            except (RevisionNotFound, ValueError, TypeError, KeyError) as e:
                problems.append((f"repo {repo_id}", f"its history cannot be read ({e})"))
                continue
            for c in commits.values():
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

    def create(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> bool:
        """Create a repo with an initial commit (of `files`); False when it already exists."""
        with self.lock(repo_id):
            if self.exists(repo_id):
                return False
            repo = self._repo(repo_id)
            entries = self.put_objects(files or {})
            first = self._write_commit(repo_id, None, entries, "initial commit", "")
            atomic_write_bytes(self._ref_file(repo_id, "refs", BRANCH), first.oid.encode())
            # repo.json last: a repo exists only once it has a branch to read
            atomic_write_bytes(repo / "repo.json", json.dumps({"private": private, "created": time.time()}).encode())
            return True

    def set_private(self, repo_id: str, private: bool) -> None:
        with self.lock(repo_id):
            meta = self.meta(repo_id)
            atomic_write_bytes(self._repo(repo_id) / "repo.json", json.dumps({**meta, "private": private}).encode())

    def put_object(self, data: bytes, fsync: bool = True) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data, fsync=fsync)
        return FileEntry(sha, git_blob_oid(data), len(data))

    def put_stream(self, chunks, sha256: str, size: int) -> FileEntry:
        """Store a file sent in chunks (an LFS upload), never held in memory: written to a temp file while
        hashed, and named by its sha256 only once it is exactly `size` bytes with that hash."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(f"{sha256!r} is not a sha256")
        target = self.object_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        h, n = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    n += len(chunk)
                    if n > size:
                        raise HubError(f"the upload is longer than the {size} bytes announced")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if n != size or h.hexdigest() != sha256:
                raise HubError(f"the upload ({n} bytes, sha256 {h.hexdigest()}) is not the {size} bytes of {sha256}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.lfs_entry(sha256, size)

    def lfs_entry(self, sha256: str, size: int | None = None) -> FileEntry:
        """The entry of an LFS file whose content is stored (HubError when it is not, or has another size;
        size None: whatever it has, for a copy of a stored file)."""
        if not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
            raise HubError(f"{sha256!r} is not a sha256")
        try:
            stored = self.object_path(sha256).stat().st_size
        except FileNotFoundError:
            raise HubError(f"the LFS object {sha256} was not uploaded") from None
        if size is not None and stored != size:
            raise HubError(f"the LFS object {sha256} has {stored} bytes, not {size}")
        return FileEntry(sha256, git_blob_oid(lfs_pointer(sha256, stored)), stored, lfs=True)

    def freshen(self, sha256: str) -> None:
        """Mark a stored object as just used (its mtime): the GC keeps it through its grace period, e.g. an LFS
        object the batch API told a client not to send again, which the client's commit will name."""
        with suppress(FileNotFoundError, ValueError):
            os.utime(self.object_path(sha256))

    def has_object(self, sha256: str, size: int) -> bool:
        try:
            return self.object_path(sha256).stat().st_size == size
        except (FileNotFoundError, ValueError):
            return False

    # An LFS object counts for a repo only once it was uploaded to that repo (a marker in its folder): a
    # commit cannot claim content by its hash alone, and the batch API does not tell whether another repo
    # (a private one) holds it.
    def _lfs_marker(self, repo_id: str, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
            raise HubError(f"{sha256!r} is not a sha256")
        return self._repo(repo_id) / "lfs" / sha256

    def mark_lfs(self, repo_id: str, sha256: str) -> None:
        atomic_write_bytes(self._lfs_marker(repo_id, sha256), b"", fsync=False)

    def repo_has_lfs(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        try:
            marked = self._lfs_marker(repo_id, sha256).exists()
        except HubError:
            return False
        return marked and (size is None or self.has_object(sha256, size))

    def put_objects(self, files: dict[str, bytes]) -> dict[str, FileEntry]:
        """Store many files' contents with one flush of the file system for all of them, not an fsync each
        (100,000 small files: seconds, not minutes). Durable on return; a commit may then name them."""
        entries = {p: self.put_object(data, fsync=False) for p, data in files.items()}
        if entries:
            sync_filesystem(self.root)
        return entries

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
        branch: str = BRANCH,
        staged: Staging | None = None,
    ) -> Commit:
        """A new commit on `branch`: its head's files, less the deleted ones, plus the added entries (whose
        objects must be stored already, see put_object, or be in `staged`: moved into objects/ only once the
        commit is known to be good). `parent`, when given, must be the head."""
        for p in [*added, *deleted, *deleted_folders]:
            validate_path(p)
        with self.lock(repo_id):
            branch = self.branch_of(repo_id, branch)
            head = self.resolve(repo_id, f"refs/heads/{branch}")
            if parent is not None and not head.oid.startswith(parent):
                raise ParentMismatch(f"the head of {repo_id!r} is {head.oid}, not {parent}: fetch and retry")
            files = dict(head.files)
            for p in deleted:
                if files.pop(p, None) is not None:
                    continue
                # the client sends a folder given without its trailing '/' as a file: the Hub deletes the folder
                inside = [f for f in files if f.startswith(p + "/")]
                if not inside:  # the Hub's (Gitaly's) words, which the client adds a hint to
                    raise EntryNotFound(f"A file with this name doesn't exist: cannot delete {p!r} from {repo_id!r}")
                for f in inside:
                    del files[f]
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                left = {p: e for p, e in files.items() if not p.startswith(prefix)}
                if len(left) == len(files):  # as a missing file: an error, not an empty commit
                    raise EntryNotFound(
                        f"A folder with this name doesn't exist: cannot delete {prefix!r} from {repo_id!r}"
                    )
                files = left
            if staged is not None:
                staged.publish()
            for p, e in added.items():
                if not self.object_path(e.sha256).exists():
                    raise HubError(f"{p!r}: its content was not uploaded")
                files[p] = e
                if e.lfs:  # the repo holds it: its LFS downloads and copies (lfsFile) may name it
                    self.mark_lfs(repo_id, e.sha256)
            commit = self._write_commit(repo_id, head.oid, files, message, description, author)
            atomic_write_bytes(self._ref_file(repo_id, "refs", branch), commit.oid.encode())
            return commit

    # --- refs --------------------------------------------------------------------------------------

    def create_branch(self, repo_id: str, branch: str, revision: str | None = None) -> Commit:
        """A new branch at `revision` (the head of main by default); RefExists when it is there already."""
        validate_ref_name(branch, "branch")
        with self.lock(repo_id):
            start = self.resolve(repo_id, revision)
            if self.head(repo_id, branch) is not None:
                raise RefExists(f"branch {branch!r} already exists in {repo_id!r}")
            atomic_write_bytes(self._ref_file(repo_id, "refs", branch), start.oid.encode())
            return start

    def delete_branch(self, repo_id: str, branch: str) -> None:
        if branch.startswith("refs/heads/"):
            branch = branch[len("refs/heads/") :]
        with self.lock(repo_id):
            if self.head(repo_id, branch) is None:
                raise RevisionNotFound(f"no branch {branch!r} in repo {repo_id!r}")
            if branch == BRANCH:
                raise HubError(f"the default branch {BRANCH!r} cannot be deleted")
            self._ref_file(repo_id, "refs", branch).unlink()

    def create_tag(self, repo_id: str, tag: str, revision: str | None = None) -> Commit:
        validate_ref_name(tag, "tag")
        with self.lock(repo_id):
            target = self.resolve(repo_id, revision)
            if self.tag(repo_id, tag) is not None:
                raise RefExists(f"tag {tag!r} already exists in {repo_id!r}")
            atomic_write_bytes(self._ref_file(repo_id, "tags", tag), target.oid.encode())
            return target

    def delete_tag(self, repo_id: str, tag: str) -> None:
        if tag.startswith("refs/tags/"):
            tag = tag[len("refs/tags/") :]
        with self.lock(repo_id):
            if self.tag(repo_id, tag) is None:
                raise RevisionNotFound(f"no tag {tag!r} in repo {repo_id!r}")
            self._ref_file(repo_id, "tags", tag).unlink()

    def squash(self, repo_id: str, branch: str, message: str, author: str = "") -> Commit:
        """Replace the history of `branch` with one commit of its head's files (the old commits stay
        readable by oid and through tags, as on the Hub)."""
        with self.lock(repo_id):
            branch = self.branch_of(repo_id, branch)
            head = self.resolve(repo_id, f"refs/heads/{branch}")
            commit = self._write_commit(repo_id, None, head.files, message, "", author)
            atomic_write_bytes(self._ref_file(repo_id, "refs", branch), commit.oid.encode())
            return commit

    # --- whole repos -------------------------------------------------------------------------------

    @contextmanager
    def _lock_all(self, *repo_ids: str):
        """Several repos' locks, always taken in the same order (two moves cannot deadlock)."""
        if not repo_ids:
            yield
            return
        first, *rest = sorted(set(repo_ids))
        with self.lock(first), self._lock_all(*rest):
            yield

    def delete(self, repo_id: str) -> None:
        """Remove a repo: one rename takes it out of sight (a crash after it leaves a folder in trash/);
        its objects stay (other repos may share them)."""
        with self.lock(repo_id):
            self.meta(repo_id)
            trash = self.root / "trash" / uuid.uuid4().hex
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._repo(repo_id), trash)
            shutil.rmtree(trash, ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        """Rename a repo (one rename: all its branches, tags and history go with it)."""
        with self._lock_all(src, dst):
            self.meta(src)
            if self.exists(dst):
                raise RepoExists(f"a repo {dst!r} already exists")
            target = self._repo(dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a leftover of an interrupted create: no repo.json, so no repo
                shutil.rmtree(target)
            os.rename(self._repo(src), target)
