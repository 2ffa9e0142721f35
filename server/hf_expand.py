"""What a file or folder of `list_repo_tree` / `get_paths_info` gets with `expand=True`, as on the Hub: the
last commit that changed it (`lastCommit`) and, for a file, its security scan status (`securityFileStatus`).

This hub scans nothing (it never unpickles and serves every file as a download, server.safe_serving), so
each file says "unscanned" with no scan results: the client reads that as not known to be safe.
"""

from __future__ import annotations

from registry.hubs.store import Commit, RepoStore
from server.hf_common import iso

UNSCANNED = {"status": "unscanned", "avScan": None, "pickleImportScan": None}


def _state(commit: Commit, path: str, folder: bool) -> object:
    """What of `commit` a change to `path` changes: the file's entry, or every entry under the folder."""
    if not folder:
        e = commit.files.get(path)
        return None if e is None else (e.oid, e.sha256, e.size)
    prefix = path + "/"
    return tuple((p, e.oid) for p, e in commit.files.items() if p.startswith(prefix))


def last_commits(store: RepoStore, repo_id: str, head: Commit, entries: list[dict]) -> dict[str, Commit]:
    """{path: the newest commit, from `head` back, whose change of the path it holds} for tree entries
    (`{"type": "file"|"directory", "path": ...}`): as `git log -1 -- PATH`, one walk of the history."""
    todo = {e["path"]: e["type"] == "directory" for e in entries}
    found: dict[str, Commit] = {}
    newer: Commit | None = None
    for c in store.walk(repo_id, head.oid):
        if newer is not None:
            for p in [p for p in todo if _state(c, p, todo[p]) != _state(newer, p, todo[p])]:
                found[p] = newer
                del todo[p]
        if not todo:
            break
        newer = c
    for p in todo:  # unchanged since the first commit
        found[p] = newer
    return found


def expand(store: RepoStore, repo_id: str, head: Commit, entries: list[dict]) -> list[dict]:
    """The entries with `lastCommit` (each) and `securityFileStatus` (files), in place."""
    last = last_commits(store, repo_id, head, entries)
    for e in entries:
        c = last[e["path"]]
        e["lastCommit"] = {"id": c.oid, "title": c.message, "date": iso(c.created)}
        if e["type"] == "file":
            e["securityFileStatus"] = dict(UNSCANNED)
    return entries
