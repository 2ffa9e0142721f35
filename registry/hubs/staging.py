"""The new objects of one commit, held apart until the commit is accepted.

    <root>/incoming/<pid>-<id>/<n>     a file's content as it arrived (small ones whole, large ones streamed)

A commit's contents are written here as the request arrives, hashed on the way (never held in memory
whole), and moved into `objects/` only once the commit is accepted (RepoStore.commit(staged=), under the
repo's lock, with one flush of the file system for all of them). A refused or interrupted commit leaves
nothing in `objects/`: its folder is removed (at the next start of the server for a process that died).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from registry.hubs.store import FileEntry, RepoStore, git_blob_oid, lfs_pointer, sync_filesystem
from w2w.errors import HubError
from w2w.formats.tensorfile import atomic_write_bytes

INCOMING = "incoming"
MULTIPART = "lfs-"  # incoming/lfs-*: a multipart LFS upload, kept across restarts (PartedFile)
MULTIPART_IDLE = 3600  # seconds without a part after which a multipart upload is given up (the links' life)
READ_BLOCK = 1 << 22
FSYNC_EACH = 16  # up to this many new contents in a commit are fsynced one by one; more: one syncfs


class StagedWriter:
    """One file's content written in pieces; sha256 and size computed on the way."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed by finish or by the staging's discard)
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._sha.update(data)
        self._f.write(data)
        self.size += len(data)

    def finish(self) -> tuple[str, int]:
        """(sha256, size) of what was written."""
        self._f.close()
        return self._sha.hexdigest(), self.size

    def close(self) -> None:
        self._f.close()


class Staging:
    """The contents of one commit in <root>/incoming/ until publish() (by RepoStore.commit) or discard()."""

    def __init__(self, store: RepoStore):
        self.store = store
        self.folder = store.root / INCOMING / f"{os.getpid()}-{uuid.uuid4().hex}"
        self.folder.mkdir(parents=True)
        self._files: dict[str, Path] = {}  # sha256 -> its staged file (one per content)
        self._writers: list[StagedWriter] = []

    def writer(self) -> StagedWriter:
        w = StagedWriter(self.folder / str(len(self._writers)))
        self._writers.append(w)
        return w

    def entry(self, writer: StagedWriter, lfs: bool) -> FileEntry:
        """The entry of a finished writer's content: an LFS entry (its oid is that of the LFS pointer, as the
        Hub reports a file it keeps in LFS), or a plain one (the git blob id, read back from the file)."""
        sha, size = self._keep(writer)
        if lfs:
            return FileEntry(sha, git_blob_oid(lfs_pointer(sha, size)), size, lfs=True)
        blob = hashlib.sha1(b"blob %d\0" % size)
        with open(self.path_of(sha), "rb") as f:
            while block := f.read(READ_BLOCK):
                blob.update(block)
        return FileEntry(sha, blob.hexdigest(), size)

    def add(self, data: bytes) -> FileEntry:
        """A small file's content, given whole."""
        w = self.writer()
        w.write(data)
        sha, size = self._keep(w)
        return FileEntry(sha, git_blob_oid(data), size)

    def _keep(self, writer: StagedWriter) -> tuple[str, int]:
        """Finish a writer; its file is kept unless the content is staged already. (Kept even when the store
        has the content: the garbage collector may remove an unreferenced object before this commit names it;
        publish() drops the copy under the repo's lock, where the collector cannot run.)"""
        sha, size = writer.finish()
        if sha in self._files:
            writer.path.unlink()
        else:
            self._files[sha] = writer.path
        return sha, size

    def path_of(self, sha256: str) -> Path:
        """Where a content of this commit (or one stored already) can be read now."""
        return self._files.get(sha256) or self.store.object_path(sha256)

    def read(self, entry: FileEntry) -> bytes:
        return self.path_of(entry.sha256).read_bytes()

    def publish(self) -> None:
        """Move every staged content into objects/ (one that is there already is dropped), durable on return:
        a few files are fsynced each (with their folders), many with one flush of the whole file system
        (100,000 small files: one call, not 100,000; a few large ones: not the other programs' writes too).
        Called under the repo's lock (RepoStore.commit): no garbage collection runs until the commit is done."""
        new = {sha: path for sha, path in self._files.items() if not self.store.object_path(sha).exists()}
        if 0 < len(new) <= FSYNC_EACH:
            for path in new.values():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        moved = set()
        for sha, path in new.items():
            target = self.store.object_path(sha)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.add(target.parent)
        if len(new) > FSYNC_EACH:
            sync_filesystem(self.store.root)
        else:
            for folder in moved | {p.parent for p in moved}:  # the renames, and any new objects/xx folder
                _fsync_dir(folder)
        self._files.clear()

    def discard(self) -> None:
        for w in self._writers:
            w.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after publish(): only what was dropped as known


class PartedFile:
    """An LFS object of known sha256 and size uploaded in parts of `part_size` (the Hub's multipart transfer),
    written in place in incoming/ in any order (a part sent again overwrites itself). Parts that come in
    order are hashed as they stream; otherwise the file is hashed once more at the end. finish() keeps it
    only when it is whole with the announced sha256.

    The upload outlives the process: its folder (incoming/lfs-<digest of repo, oid, size, part size>) holds
    the data and, per part received, the ETag given for it, written once the part is on disk. A server
    restarted between two parts opens the same folder, and the client's retry of the next part, then its
    completion (naming the ETags of the parts before the restart too), finish the object. A folder idle for
    MULTIPART_IDLE seconds is stale (stale_incoming)."""

    def __init__(self, store: RepoStore, repo_id: str, sha256: str, size: int, part_size: int):
        self.store, self.sha256, self.size, self.part_size = store, sha256, size, part_size
        self.parts = max(1, -(-size // part_size))
        key = json.dumps([repo_id, sha256, size, part_size])
        self.folder = store.root / INCOMING / f"{MULTIPART}{hashlib.sha256(key.encode()).hexdigest()[:32]}"
        self.path = self.folder / "data"
        self.done: dict[int, str] = {}  # part number -> the etag given for it
        self._sha = hashlib.sha256()
        self._hashed = 0  # parts hashed in order so far (1..hashed)
        self._in_order = True  # False once a part came out of order or again: hash the whole at the end
        self._lock = threading.Lock()
        if self._resume(key):
            self._in_order = not self.done  # a hash's state does not survive the process: hash at the end
            return
        shutil.rmtree(self.folder, ignore_errors=True)  # a folder whose creation was interrupted
        self.folder.mkdir(parents=True)
        with open(self.path, "wb") as f:
            f.truncate(size)
        atomic_write_bytes(self.folder / "upload.json", key.encode(), fsync=False)  # last: the folder is whole

    def _resume(self, key: str) -> bool:
        """Take up the parts an earlier process received for this upload; False when there is none."""
        try:
            if (self.folder / "upload.json").read_text() != key or self.path.stat().st_size != self.size:
                return False
        except FileNotFoundError:
            return False
        for f in self.folder.glob("part-*"):
            n = f.name[len("part-") :]
            if n.isdigit() and 1 <= int(n) <= self.parts:
                self.done[int(n)] = f.read_text()
        return True

    def part_length(self, n: int) -> int:
        return min(self.part_size, self.size - (n - 1) * self.part_size)

    def write_part(self, n: int, batches: Iterable[bytes]) -> str:
        """Write part n (1-based) from the body's batches; its etag."""
        if not 1 <= n <= self.parts:
            raise HubError(f"part {n} is not one of the {self.parts} parts of this upload")
        with self._lock:
            hashing = self._in_order and n == self._hashed + 1
            if not hashing:
                self._in_order = False
            self.done.pop(n, None)
        (self.folder / f"part-{n}").unlink(missing_ok=True)  # a part being written again is not received
        sha = self._sha.copy() if hashing else None
        want, got = self.part_length(n), 0
        with open(self.path, "r+b") as f:
            f.seek((n - 1) * self.part_size)
            for batch in batches:
                got += len(batch)
                if got > want:
                    raise HubError(f"part {n} is longer than its {want} bytes")
                if sha is not None:
                    sha.update(batch)
                f.write(batch)
        if got != want:
            raise HubError(f"part {n} has {got} bytes, not {want}")
        etag = uuid.uuid4().hex
        atomic_write_bytes(self.folder / f"part-{n}", etag.encode(), fsync=False)  # the part is on disk
        with self._lock:
            if sha is not None and self._in_order and self._hashed == n - 1:
                self._sha, self._hashed = sha, n
            self.done[n] = etag
        return etag

    def finish(self, etags: dict[int, str]) -> None:
        """Check the parts the client names against those received, the size and the sha256, then move the
        file into objects/ (flushed). HubError, the file left in place, when anything is off."""
        if etags != self.done or len(etags) != self.parts:
            raise HubError(f"the parts named ({len(etags)}) are not the {self.parts} parts received")
        if self._in_order and self._hashed == self.parts:
            sha = self._sha
        else:
            sha = hashlib.sha256()
            with open(self.path, "rb") as f:
                while block := f.read(READ_BLOCK):
                    sha.update(block)
        if sha.hexdigest() != self.sha256:
            raise HubError(f"the parts put together are not {self.sha256} (sha256 {sha.hexdigest()})")
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())
        target = self.store.object_path(self.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        _fsync_dir(target.parent)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_incoming(store: RepoStore) -> list[Path]:
    """What commits of processes that no longer run left in incoming/, and multipart uploads idle for an hour."""
    base = store.root / INCOMING
    if not base.is_dir():
        return []
    stale = []
    for folder in sorted(base.iterdir()):
        if folder.name.startswith(MULTIPART):  # outlives its process; stale once idle
            if _idle(folder) > MULTIPART_IDLE:
                stale.append(folder)
            continue
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):  # this process too: another server of it may be mid-commit
            continue
        stale.append(folder)
    return stale


def _idle(folder: Path) -> float:
    """Seconds since anything in `folder` was last written."""
    try:
        return time.time() - max(f.stat().st_mtime for f in [folder, *folder.iterdir()])
    except FileNotFoundError:  # removed meanwhile
        return 0.0


def clean_incoming(store: RepoStore) -> int:
    """Remove what commits of processes that no longer run left in incoming/, and multipart uploads idle for
    an hour; the number removed."""
    stale = stale_incoming(store)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return len(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
