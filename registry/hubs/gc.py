"""Garbage collection of the repo store (`w2wreg hub gc`): what no revision names any more is removed.

Removed, once older than the grace period:
- commit records no branch or tag reaches (left by super_squash_history, a deleted branch or tag, a commit
  refused after its record was written); until then they stay readable by oid, as after a squash;
- objects no remaining commit names: the files of deleted repos, of squashed history and deleted branches,
  LFS objects uploaded but never committed (the grace period covers an upload whose commit is still to come);
- leftovers of interrupted writes: temp files in objects/ and in repo folders (once an hour old, whatever the
  grace period: an LFS upload streams into one outside any lock), trash/ of interrupted deletes.
Removed at once: incoming/ folders of processes that no longer run and expired multipart uploads
(registry.hubs.staging.stale_incoming), and the LFS markers of objects that are gone.

Safe with the server running: most of the history is read first without any lock; then, holding the store's
GC lock exclusively (RepoStore.exclusive: no commit, ref change, create, delete or move is in flight, as each
holds it shared), the refs are read again, the commits made meanwhile are walked, and only then is anything
removed. A commit's staged files are in incoming/ until it holds the lock, so they are never candidates.
Crash-safe: each removal is one unlink (or rmtree of a leftover) of something no kept revision names, commit
records before the objects they name, so a collector killed anywhere leaves a store that reads as before,
with less garbage; the next run finishes the work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from registry.hubs.staging import stale_incoming
from registry.hubs.store import RepoStore
from w2w.errors import HubError

DEFAULT_GRACE = 3600.0  # seconds
# a temp file may belong to a write in flight outside any lock (an LFS upload streaming into objects/, a repo's
# LFS marker): removed only once this old, whatever the grace period
TEMP_AGE = 3600.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class GcError(HubError):
    pass


def parse_duration(text: str) -> float:
    """Seconds of a duration like 0, 90s, 30m, 1h, 2d; GcError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise GcError(f"{text!r} is not a duration: give seconds or a number with s, m, h or d (e.g. 30m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Removed:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    repos: int = 0
    live_objects: int = 0
    commits: Removed = field(default_factory=Removed)  # unreachable commit records
    objects: Removed = field(default_factory=Removed)  # objects no kept commit names
    leftovers: Removed = field(default_factory=Removed)  # incoming/, temp files, trash/
    markers: int = 0  # LFS markers of removed objects
    young: Removed = field(default_factory=Removed)  # unreferenced objects kept for the grace period

    @property
    def bytes_freed(self) -> int:
        return self.commits.bytes + self.objects.bytes + self.leftovers.bytes

    def to_json(self) -> dict:
        return asdict(self) | {"bytes_freed": self.bytes_freed}


class _History:
    """Which commits each repo folder reaches and which objects they name; commits parsed once per run."""

    def __init__(self, root: Path):
        self.root = root
        self._commits: dict[tuple[str, str], tuple[str | None, frozenset[str]]] = {}  # (folder, oid) -> parent, shas

    def folders(self) -> list[Path]:
        """Every repo folder, a valid id or not (one from before the id rules still holds history): NS/NAME
        folders with a commits/ folder."""
        base = self.root / "repos"
        if not base.is_dir():
            return []
        return sorted(r for ns in base.iterdir() if ns.is_dir() for r in ns.iterdir() if (r / "commits").is_dir())

    def _commit(self, folder: Path, oid: str) -> tuple[str | None, frozenset[str]] | None:
        key = (str(folder), oid)
        if key not in self._commits:
            path = folder / "commits" / f"{oid}.json"
            try:
                record = json.loads(path.read_text())
                parsed = record.get("parent"), frozenset(e["sha256"] for e in record["files"].values())
            except FileNotFoundError:
                return None  # a parent that is gone: the walk ends (nothing names what it named)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise GcError(
                    f"{path} cannot be read ({e}): nothing was removed; `w2wreg verify` checks the repos"
                ) from None
            self._commits[key] = parsed
        return self._commits[key]

    def reach(self, folder: Path, cutoff: float) -> set[str]:
        """The commits of a repo folder to keep: those its branches and tags reach, and those written after
        `cutoff` with what they reach."""
        roots = []
        for kind in ("refs", "tags"):
            if (folder / kind).is_dir():
                roots += [f.read_text().strip() for f in (folder / kind).iterdir() if f.is_file() and f.name[0] != "."]
        with os.scandir(folder / "commits") as it:
            roots += [e.name[:-5] for e in it if e.name.endswith(".json") and e.stat().st_mtime >= cutoff]
        kept: set[str] = set()
        for oid in roots:
            while oid and oid not in kept:
                found = self._commit(folder, oid)
                if found is None:
                    break
                kept.add(oid)
                oid = found[0]
        return kept

    def objects(self, folder: Path, commits: set[str]) -> set[str]:
        return set().union(*(self._commits[(str(folder), oid)][1] for oid in commits))


def collect(store: RepoStore, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> GcReport:
    """Remove what no revision of `store` names (see the module's docstring); what was (or, dry_run, would be)
    removed. GcError, with nothing removed, when a commit record cannot be read."""
    if grace < 0:
        raise GcError("the grace period cannot be negative")
    history = _History(store.root)
    for folder in history.folders():  # without the lock: the bulk of the reading
        with suppress(FileNotFoundError):  # a repo deleted or moved meanwhile: read again under the lock
            history.reach(folder, time.time() - grace)
    with store.exclusive():
        cutoff = time.time() - grace
        report = GcReport(dry_run=dry_run, grace_seconds=grace)
        kept = {folder: history.reach(folder, cutoff) for folder in history.folders()}
        live = set().union(*(history.objects(f, c) for f, c in kept.items()))
        report.repos, report.live_objects = len(kept), len(live)
        for folder, commits in kept.items():  # commit records first: none may outlive its objects
            _sweep_commits(folder, commits, cutoff, report, dry_run)
        removed = _sweep_objects(store, live, cutoff, report, dry_run)
        for folder in kept:
            _sweep_markers(store, folder, removed, report, dry_run)
        _sweep_leftovers(store, report, dry_run)
    return report


def _remove(path: Path, dry_run: bool) -> None:
    if not dry_run:
        path.unlink(missing_ok=True)


def _sweep_commits(folder: Path, kept: set[str], cutoff: float, report: GcReport, dry_run: bool) -> None:
    for sub in ("commits", "refs", "tags", "lfs"):
        if not (folder / sub).is_dir():
            continue
        with os.scandir(folder / sub) as it:
            for e in it:
                st = e.stat()
                if e.name.startswith("."):  # an interrupted atomic write's temp file
                    if st.st_mtime < min(cutoff, time.time() - TEMP_AGE):
                        report.leftovers.add(st.st_size)
                        _remove(Path(e.path), dry_run)
                elif sub == "commits" and e.name.endswith(".json") and e.name[:-5] not in kept:
                    report.commits.add(st.st_size)
                    _remove(Path(e.path), dry_run)


def _sweep_objects(store: RepoStore, live: set[str], cutoff: float, report: GcReport, dry_run: bool) -> set[str]:
    """Remove unreferenced objects older than `cutoff` (and old temp files); the removed objects' sha256."""
    removed: set[str] = set()
    base = store.root / "objects"
    if not base.is_dir():
        return removed
    for shard in sorted(base.iterdir()):
        if not shard.is_dir():
            continue
        with os.scandir(shard) as it:
            for e in it:
                st = e.stat()
                if _SHA256.fullmatch(e.name):
                    if e.name in live:
                        continue
                    if st.st_mtime >= cutoff:  # maybe an LFS upload whose commit is still to come
                        report.young.add(st.st_size)
                        continue
                    report.objects.add(st.st_size)
                    removed.add(e.name)
                elif st.st_mtime < min(cutoff, time.time() - TEMP_AGE):  # an interrupted upload's temp file
                    report.leftovers.add(st.st_size)
                else:
                    continue
                _remove(Path(e.path), dry_run)
    return removed


def _sweep_markers(store: RepoStore, folder: Path, removed: set[str], report: GcReport, dry_run: bool) -> None:
    """LFS markers (a repo's claim to an object it uploaded) of objects that are gone (or go in this run)."""
    if not (folder / "lfs").is_dir():
        return
    for marker in (folder / "lfs").iterdir():
        name = marker.name
        if _SHA256.fullmatch(name) and (name in removed or not store.object_path(name).exists()):
            report.markers += 1
            _remove(marker, dry_run)


def _sweep_leftovers(store: RepoStore, report: GcReport, dry_run: bool) -> None:
    """What interrupted work left: incoming/ of dead processes and expired multipart uploads, trash/."""
    trash = store.root / "trash"
    gone = stale_incoming(store) + (sorted(trash.iterdir()) if trash.is_dir() else [])
    for path in gone:
        report.leftovers.add(_size(path))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file())
