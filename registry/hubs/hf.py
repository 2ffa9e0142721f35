"""Hugging Face-protocol hubs (huggingface.co, or a `w2wreg serve` of your team) through huggingface_hub.

The token comes from `token=`, else huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`).
"""

from __future__ import annotations

from pathlib import Path

from registry.hubs import validate_repo_id
from w2w.errors import HubError


class HfHub:
    """A Hub (see registry.hubs) on a Hugging Face-protocol endpoint."""

    def __init__(self, endpoint: str, token: str | None = None, cache_dir: Path | None = None):
        from huggingface_hub import HfApi

        self.endpoint = endpoint.rstrip("/")
        self.name = f"hf:{self.endpoint}"
        self.cache_dir = cache_dir
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def _call(self, what: str, fn, *args, **kw):
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return fn(*args, **kw)
        except RevisionNotFoundError as e:
            raise HubError(f"{what}: no such revision on {self.endpoint} ({_first_line(e)})") from None
        except RepositoryNotFoundError:
            raise HubError(
                f"{what}: no such repo on {self.endpoint}, or it is private and no valid token was given "
                "(set HF_TOKEN or run `hf auth login`)"
            ) from None
        except HfHubHTTPError as e:
            raise HubError(f"{what} on {self.endpoint} failed: {_first_line(e)}") from None
        except OSError as e:  # connection refused, DNS, timeouts (httpx errors are OSErrors or wrap them)
            raise HubError(f"{what}: cannot reach {self.endpoint} ({e})") from None
        except Exception as e:
            if type(e).__module__.startswith(("httpx", "httpcore")):
                raise HubError(f"{what}: cannot reach {self.endpoint} ({e})") from None
            raise

    def upload(self, repo_id: str, files: dict[str, bytes], message: str) -> str:
        from huggingface_hub import CommitOperationAdd

        validate_repo_id(repo_id)
        self._call(f"creating {repo_id}", self.api.create_repo, repo_id, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in files.items()]
        info = self._call(f"pushing to {repo_id}", self.api.create_commit, repo_id, ops, commit_message=message)
        return info.oid

    def download(self, repo_id: str, revision: str | None = None) -> tuple[Path, str]:
        validate_repo_id(repo_id)
        sha = self._call(f"reading {repo_id}", self.api.model_info, repo_id, revision=revision).sha
        folder = self._call(
            f"downloading {repo_id}@{sha[:12]}",
            self.api.snapshot_download,
            repo_id,
            revision=sha,  # pinned: a push between the two calls cannot mix revisions
            cache_dir=self.cache_dir,
        )
        return Path(folder), sha

    def list_files(self, repo_id: str) -> list[str]:
        validate_repo_id(repo_id)
        return sorted(self._call(f"listing {repo_id}", self.api.list_repo_files, repo_id))


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[-1] if lines else type(e).__name__
