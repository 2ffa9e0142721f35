"""Where each part of a registry lives on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = "w2w-registry"
ENV_VAR = "W2WREG_HOME"


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


@dataclass(frozen=True)
class RegistryPaths:
    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def repos(self) -> Path:
        """The versioned repos of `w2wreg serve` (registry.hubs.store)."""
        return self.root / "repos"

    def vectors(self, space_id: str) -> Path:
        return self.root / "vectors" / space_id

    def index(self, space_id: str) -> Path:
        return self.root / "index" / space_id
