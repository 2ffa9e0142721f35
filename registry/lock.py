"""One writer at a time: a file lock around every change to a registry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from w2w.errors import RegistryLockedError


@contextmanager
def writer_lock(path: Path, root: Path, timeout: float = 60.0) -> Iterator[None]:
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise RegistryLockedError(root, timeout) from None
    try:
        yield
    finally:
        lock.release()
