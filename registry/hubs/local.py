"""The local folder hub: `<root>/<namespace>/<name>/` repos in the Hugging Face layout.

A commit writes every file atomically, then the revision marker last; the revision is the sha256 of
the repo's file list and contents, so the same files always give the same revision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from registry.hubs import validate_repo_id
from w2w.errors import HubError
from w2w.formats.tensorfile import atomic_write_bytes

COMMIT_FILE = ".w2wreg-commit.json"


def _safe_relpath(path: str) -> str:
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
        raise HubError(f"{path!r} is not a valid file path inside a repo")
    return path


class LocalHub:
    """A folder hub. The registry's own is named "local"; any other folder is named by its path, so the
    catalog's records of pushes (and `verify`) never mistake one folder hub for another."""

    def __init__(self, root: Path, name: str | None = None):
        self.root = Path(root)
        self.name = name or f"folder:{self.root.resolve()}"

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / validate_repo_id(repo_id)

    def _revision(self, repo: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in repo.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(f.relative_to(repo).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()[:40]

    def upload(self, repo_id: str, files: dict[str, bytes], message: str) -> str:
        repo = self.repo_dir(repo_id)
        for path, data in files.items():
            atomic_write_bytes(repo / _safe_relpath(path), data)
        revision = self._revision(repo)
        atomic_write_bytes(repo / COMMIT_FILE, json.dumps({"revision": revision, "message": message}).encode())
        return revision

    def download(self, repo_id: str, revision: str | None = None) -> tuple[Path, str]:
        repo = self.repo_dir(repo_id)
        if not repo.is_dir():
            raise HubError(f"no repo {repo_id!r} on the local hub ({self.root})")
        current = self._revision(repo)
        if revision and not current.startswith(revision):
            raise HubError(
                f"repo {repo_id!r} is at revision {current[:12]}, not {revision}; the local hub keeps only the latest"
            )
        return repo, current

    def list_files(self, repo_id: str) -> list[str]:
        repo, _ = self.download(repo_id)
        return sorted(
            p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def list_repos(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            f"{ns.name}/{r.name}" for ns in self.root.iterdir() if ns.is_dir() for r in ns.iterdir() if r.is_dir()
        )
