"""Hubs: places LoRA repos are pushed to and pulled from, behind one small interface.

The default is a local folder hub inside the registry (`hub/<namespace>/<name>/`, Hugging Face layout);
any Hugging Face-protocol endpoint (huggingface.co, a `w2wreg serve`) is an `HfHub` (registry.hubs.hf).
`open_hub` turns what a user typed after `--hub` into one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from w2w.errors import HubError

# The Hub's own rules (huggingface_hub's validate_repo_id): each part 1-96 of [A-Za-z0-9._-], starting and
# ending with a letter, digit or '_'; no '--' or '..'; not ending in '.git'. fullmatch: no trailing newline.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{_PART}/{_PART}")


def validate_repo_id(repo_id: str) -> str:
    if (
        not isinstance(repo_id, str)
        or not REPO_ID.fullmatch(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.lower().endswith(".git")
    ):
        raise HubError(
            f"{repo_id!r} is not a valid repo id; use NAMESPACE/NAME, each of letters, digits, '.', '_' or '-' "
            "(at most 96, starting and ending with a letter or digit, no '--' or '..')"
        )
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


def open_hub(spec: str | Path | None, default: Hub | None = None) -> Hub:
    """`--hub` as typed: None -> `default` (the registry's own), http(s)://... -> HfHub, else a folder hub."""
    if spec is None or str(spec) == "":
        if default is None:
            raise HubError("no hub given")
        return default
    text = str(spec)
    if text.startswith(("http://", "https://")):
        from registry.hubs.hf import HfHub

        return HfHub(text)  # the token: huggingface_hub's own lookup (HF_TOKEN, `hf auth login`)
    from registry.hubs.local import LocalHub

    return LocalHub(Path(text))
