"""Hubs: places LoRA repos are pushed to and pulled from, behind one small interface.

The default is a local folder hub inside the registry (`hub/<namespace>/<name>/`, Hugging Face layout).
Hugging Face-protocol endpoints come with the hub issue; they implement the same `Hub` protocol.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from w2w.errors import HubError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id:
        raise HubError(f"{repo_id!r} is not a valid repo id; use NAMESPACE/NAME with letters, digits, '.', '_' or '-'")
    return repo_id


class Hub(Protocol):
    name: str

    def upload(self, repo_id: str, files: dict[str, bytes], message: str) -> str:
        """Write `files` (path in repo -> content) as one commit; returns the new revision."""
        ...

    def download(self, repo_id: str, revision: str | None = None) -> tuple[Path, str]:
        """A local folder with the repo's files, and the revision it holds."""
        ...

    def list_files(self, repo_id: str) -> list[str]: ...
