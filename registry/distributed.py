"""Passes over the vector store as Dask tasks: `fit --scheduler ADDRESS` gives the same subspace.

Every block's products are independent, so a pass is a map over blocks plus a sum. The large shared
inputs (mean, std, the D x l basis) are scattered to the workers once per pass. Workers read the
vector shards from the same path, so the registry folder must be on storage they all see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from w2w.subspace import BlockSource


def _load_and_apply(fn: Callable[..., Any], source: BlockSource, spec: Any, *shared: Any) -> Any:
    return fn(*shared, spec, source.load(spec))


def dask_mapper(address: str):
    """A MapBlocks that runs each pass on the Dask cluster at `address` (e.g. tcp://10.0.0.5:8786)."""
    from distributed import Client

    client = Client(address)

    def map_blocks(fn: Callable[..., Any], source: BlockSource, specs: list[Any], shared: tuple = ()) -> Iterable[Any]:
        src = client.scatter(source, broadcast=True, hash=False)
        shared_f = [client.scatter(x, broadcast=True, hash=False) for x in shared]  # unique keys: no reuse races
        futures = [client.submit(_load_and_apply, fn, src, spec, *shared_f, pure=False) for spec in specs]
        for f in futures:  # in block order, so results match the in-process pass exactly
            yield f.result()
            f.release()

    map_blocks.client = client  # type: ignore[attr-defined]
    return map_blocks
