"""What every route of the server shares: the registry, the repo store, the accounts, the limits."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from registry.hubs.staging import clean_incoming
from registry.hubs.store import RepoStore
from registry.registry import Registry
from server.accounts import Accounts

DEFAULT_MAX_UPLOAD = 1 << 30  # 1 GiB per request: a LoRA is megabytes; a base model does not belong here


@dataclass
class ServerState:
    registry: Registry
    accounts: Accounts
    private: bool = False
    max_upload: int = DEFAULT_MAX_UPLOAD
    index_branches: bool = False  # index LoRAs pushed to branches other than main too
    # preupload answers "lfs" as the Hub does (server.hf_lfs). Off by default: a client with hf_xet installed
    # (huggingface_hub's default) sends every "lfs" file through Xet, which this server does not speak.
    lfs: bool = False
    lfs_part_size: int = 64 << 20  # an LFS object bigger than this goes up in parts of it (multipart transfer)
    store: RepoStore = field(init=False)
    # The catalog's caches and DuckDB connections are not made for concurrent threads: registry work is
    # serialized (a team hub's requests are short; downloads of repo files do not take this lock).
    lock: threading.RLock = field(default_factory=threading.RLock)
    cache: dict = field(default_factory=dict)  # derived data keyed on the catalog's version (server.access)

    def __post_init__(self):
        self.store = RepoStore(self.registry.paths.repos)
        clean_incoming(self.store)  # what commits of a server that died left half-received
