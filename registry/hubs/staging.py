"""The new objects of one commit, held apart until the commit is accepted.

    <root>/incoming/<pid>-<id>/<n>     a file's content as it arrived (small ones whole, large ones streamed)

A commit's contents are written here as the request arrives, hashed on the way (never held in memory
whole), and moved into `objects/` only once the commit is accepted (RepoStore.commit(staged=), under the
repo's lock, with one flush of the file system for all of them). A refused or interrupted commit leaves
nothing in `objects/`: its folder is removed (at the next start of the server for a process that died).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from registry.hubs.store import FileEntry, RepoStore, git_blob_oid, lfs_pointer, sync_filesystem

INCOMING = "incoming"
READ_BLOCK = 1 << 22


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
        """Finish a writer; its file is kept unless the content is staged or stored already."""
        sha, size = writer.finish()
        if sha in self._files or self.store.object_path(sha).exists():
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
        """Move every staged content into objects/ (one that is there already is dropped), flushed once."""
        for sha, path in self._files.items():
            target = self.store.object_path(sha)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if self._files:
            sync_filesystem(self.store.root)
        self._files.clear()

    def discard(self) -> None:
        for w in self._writers:
            w.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after publish(): only what was dropped as known


def clean_incoming(store: RepoStore) -> int:
    """Remove what commits of processes that no longer run left in incoming/; the number removed."""
    base = store.root / INCOMING
    if not base.is_dir():
        return 0
    removed = 0
    for folder in base.iterdir():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):  # this process too: another server of it may be mid-commit
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
