"""The append-only vector store of one space: float32 rows in fixed-size shard files, memory-mapped.

`vectors/<space>/shard-00000.f32` holds rows 0..S-1 as raw little-endian float32, and so on. The
number of rows that exist is the catalog's, not the files': rows are written (and fsynced) before the
catalog commits them, so a crash leaves at most an uncommitted tail, which `truncate` drops.
Reads never load more than the rows asked for (or one block at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARD_TARGET_BYTES = 512 * 1024 * 1024
MAX_ROWS_PER_SHARD = 4096


def rows_per_shard_for(dim: int) -> int:
    return max(1, min(MAX_ROWS_PER_SHARD, SHARD_TARGET_BYTES // (4 * dim)))


def consecutive(rows: np.ndarray) -> bool:
    """Whether the row numbers are a run: r, r + 1, ..., in order."""
    return bool(np.all(np.diff(rows) == 1))


class VectorStore:
    def __init__(self, folder: Path, dim: int, rows_per_shard: int):
        self.folder, self.dim, self.rows_per_shard = Path(folder), int(dim), int(rows_per_shard)
        self.row_bytes = 4 * self.dim

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.f32"

    def shards_on_disk(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.f32")) if self.folder.exists() else []

    def rows_on_disk(self) -> int:
        shards = self.shards_on_disk()
        if not shards:
            return 0
        return (len(shards) - 1) * self.rows_per_shard + shards[-1].stat().st_size // self.row_bytes

    # --- writing ---------------------------------------------------------------------------------

    def truncate(self, n_rows: int) -> None:
        """Drop every row at or after `n_rows` (an uncommitted tail left by a crash or an aborted add)."""
        for p in self.shards_on_disk():
            i = int(p.stem.split("-")[1])
            keep = max(0, min(self.rows_per_shard, n_rows - i * self.rows_per_shard))
            if keep == 0:
                p.unlink()
            elif p.stat().st_size != keep * self.row_bytes:
                os.truncate(p, keep * self.row_bytes)

    def write_rows(self, start: int, rows: np.ndarray | list[np.ndarray], fsync: bool = True) -> None:
        """Write rows ((n, D) array, or a list of (D,) vectors) from row `start`, the current end of the store."""
        if isinstance(rows, np.ndarray):
            assert rows.ndim == 2 and rows.shape[1] == self.dim, f"rows {rows.shape} for D={self.dim}"
            rows = list(rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        pos, done = start, 0
        while done < len(rows):
            shard, offset = divmod(pos, self.rows_per_shard)
            n = min(len(rows) - done, self.rows_per_shard - offset)
            path = self.shard_path(shard)
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.seek(offset * self.row_bytes)
                for v in rows[done : done + n]:
                    v = np.ascontiguousarray(v, dtype="<f4")
                    assert v.shape == (self.dim,), f"row of shape {v.shape} for D={self.dim}"
                    f.write(memoryview(v).cast("B"))  # no intermediate copy of the block
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            pos, done = pos + n, done + n

    # --- reading ---------------------------------------------------------------------------------

    def map(self, shard: int, n_rows: int) -> np.ndarray:
        """Rows [0, n_rows) of one shard as a read-only (n_rows, D) memory map."""
        path = self.shard_path(shard)
        try:
            return np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, self.dim))
        except (OSError, ValueError):
            from w2w.errors import IntegrityError

            raise IntegrityError(
                f"{path} is missing or shorter than the catalog says ({n_rows} rows); run `w2wreg verify`"
            ) from None

    def rows_available(self, shard: int) -> int:
        """Whole rows present in one shard file (0 when it is missing)."""
        p = self.shard_path(shard)
        return p.stat().st_size // self.row_bytes if p.exists() else 0

    def read(self, rows: np.ndarray | list[int], out: np.ndarray | None = None) -> np.ndarray:
        """The given rows, (len(rows), D), copied into memory in the order asked (into `out` when given)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32) if out is None else out
        shards = rows // self.rows_per_shard
        for shard in np.unique(shards):
            sel = np.nonzero(shards == shard)[0]
            local = rows[sel] - shard * self.rows_per_shard
            lo, hi = int(local.min()), int(local.max()) + 1
            mm = self.map(int(shard), hi)
            if consecutive(local) and consecutive(sel):
                out[sel[0] : sel[-1] + 1] = mm[lo:hi]  # a run of rows: one copy (mm[local] makes two)
            else:
                out[sel] = mm[local]
        return out

    def view(self, first: int, count: int) -> np.ndarray | None:
        """Rows [first, first + count) as a read-only memory map, when they lie in one shard (else None)."""
        shard, lo = divmod(first, self.rows_per_shard)
        if lo + count > self.rows_per_shard:
            return None
        return self.map(shard, lo + count)[lo:]

    def read_one(self, row: int) -> np.ndarray:
        return self.read([row])[0]
