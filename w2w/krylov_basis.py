"""The Krylov basis of a fit, K = [G_0 .. G_q] (D x m float32), in RAM or on disk, and its blocked products.

K is kept as its column blocks G_i (D x l each, row-major). Every product with K is a sum over row chunks
of K, so when the blocks are on disk only one chunk (c x m) is in memory at a time: the fit's memory is then
O(D l + m^2), not O(D m). The blocks on disk are unlinked temporary files (`tempfile.TemporaryFile`): the
OS reclaims them when the process ends, however it ends, so a crash leaves nothing behind.

Chunks are read with pread into buffers that are reused (not a memory map: mapped pages of a multi-GB file
count in the process's RSS, and the memory budget is about RSS).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# a chunk of K: large enough for BLAS at full speed, small against the budget (64 MB ran the orthogonalization
# of a block against 1,400 columns on disk as fast as 256 MB did: 4.8 s against 5.0, one-off; the plan 192 MB less)
CHUNK_BYTES = 64 << 20


def chunk_rows(m: int) -> int:
    """Rows of K per chunk for a basis of m columns (the formula fit_plan uses too)."""
    return int(min(16384, max(64, CHUNK_BYTES // (4 * max(m, 1)))))


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):  # pread may return fewer bytes than asked
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read of a Krylov block at byte {offset + done}")
        done += got


class KrylovBasis:
    """Column blocks of K, in RAM (folder None) or as unlinked temporary files in `folder`."""

    def __init__(self, dim: int, m: int, folder: str | Path | None = None, device: str | None = None):
        self.dim, self.rows = dim, chunk_rows(m)
        self.device = device  # None: numpy products here; else torch products on that device
        self.on_disk = folder is not None
        self.folder = Path(folder) if folder is not None else None
        self.blocks: list[np.ndarray] = []  # in RAM: the blocks; on disk: one reused (rows, l_i) buffer each
        self.files: list = []
        self.widths: list[int] = []
        self.colsum = np.zeros(0)  # 1^T K in float64, for the sign convention of the components

    @property
    def used(self) -> int:
        return sum(self.widths)

    def append(self, G: np.ndarray) -> None:
        """Add a block (D, b) as the last columns of K."""
        G = np.ascontiguousarray(G, dtype=np.float32)
        assert G.shape[0] == self.dim, f"a block of {G.shape[0]} rows for a basis of D = {self.dim}"
        self.colsum = np.concatenate([self.colsum, G.sum(axis=0, dtype=np.float64)])
        self.widths.append(G.shape[1])
        if not self.on_disk:
            self.blocks.append(G)  # kept as it is: a copy into new_block's array would cost a block of RAM
            return
        f = self._open_block_file(G.shape[1])
        f.write(memoryview(G.reshape(-1)).cast("B"))
        f.flush()

    def new_block(self, width: int) -> np.ndarray | _BlockFile:
        """Room for a block (D, width) as the last columns of K, to be filled by row ranges (`block[lo:hi] =
        rows`, every row once) before it is read: an array in RAM, a file on disk (nothing of it in memory).
        Its column sums are not taken (`colsum` covers the appended blocks)."""
        self.widths.append(width)
        if not self.on_disk:
            self.blocks.append(np.empty((self.dim, width), dtype=np.float32))
            return self.blocks[-1]
        return _BlockFile(self._open_block_file(width), width)

    def _open_block_file(self, width: int):
        """A new unlinked file in `folder` for the next block (D, width), with its chunk buffer; kept (and
        closed) by close(), so a write that fails leaves nothing open."""
        self.folder.mkdir(parents=True, exist_ok=True)
        f = tempfile.TemporaryFile(dir=self.folder, prefix="krylov-")  # noqa: SIM115 (kept open until close())
        self.files.append(f)
        self.blocks.append(np.empty((min(self.rows, self.dim), width), dtype=np.float32))
        return f

    def chunks(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(lo, hi, [G_i[lo:hi] for every block]): the row chunks of K, in order. On disk the arrays are
        buffers reused by the next chunk."""
        for lo in range(0, self.dim, self.rows):
            hi = min(lo + self.rows, self.dim)
            if not self.on_disk:
                yield lo, hi, [G[lo:hi] for G in self.blocks]
                continue
            parts = []
            for f, buf, b in zip(self.files, self.blocks, self.widths, strict=True):
                part = buf[: hi - lo]
                _pread_into(f.fileno(), part, 4 * lo * b)
                parts.append(part)
            yield lo, hi, parts

    def close(self) -> None:
        for f in self.files:
            f.close()  # unlinked already: closing frees the disk space
        self.files, self.blocks, self.widths = [], [], []

    def __enter__(self) -> KrylovBasis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- products, each one read of K ------------------------------------------------------------------
    # The same code runs numpy (device None) or torch on a device: _dev moves an operand there, _host back.

    def _dev(self, a: np.ndarray):
        if self.device is None:
            return a
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _host(self, a) -> np.ndarray:
        return a if self.device is None else a.cpu().numpy()

    def _zeros(self, shape: tuple[int, int]):
        if self.device is None:
            return np.zeros(shape, dtype=np.float64)
        import torch

        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def tdot(self, *Bs: np.ndarray) -> list[np.ndarray]:
        """K^T B for each B (D, b): (used, b) float64, accumulated over chunks of float32 products (D is
        long: float32 sums over it drift)."""
        outs = [self._zeros((self.used, B.shape[1])) for B in Bs]
        for lo, hi, parts in self.chunks():
            chunks, at = [self._dev(B[lo:hi]) for B in Bs], 0
            for part in map(self._dev, parts):
                b = part.shape[1]
                for out, B in zip(outs, chunks, strict=True):
                    out[at : at + b] += part.T @ B  # (b, b_B)
                at += b
        return [self._host(out) for out in outs]

    def tdot_last(self) -> np.ndarray:
        """K^T G (used, b) float64 for G K's last block, in one read of K; the diagonal block G^T G is the
        same sums in RAM and on disk (in both its two operands are one buffer, which numpy computes as SYRK)."""
        out = self._zeros((self.used, self.widths[-1]))
        for _, _, parts in self.chunks():
            parts, at = [self._dev(p) for p in parts], 0
            for part in parts:
                out[at : at + part.shape[1]] += part.T @ parts[-1]
                at += part.shape[1]
        return self._host(out)

    def _times_chunks(self, C: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(lo, hi, (K @ C)[lo:hi]) for each row chunk of K, C (used, b): the chunk arrays are reused."""
        C = self._dev(C.astype(np.float32))
        bufs = None  # in numpy, the sum and one product in two buffers that every chunk reuses
        if self.device is None:
            bufs = [np.empty((min(self.rows, self.dim), C.shape[1]), dtype=np.float32) for _ in range(2)]
        for lo, hi, parts in self.chunks():
            acc, at = None, 0
            for part in map(self._dev, parts):
                b = part.shape[1]
                if bufs is None:
                    prod = part @ C[at : at + b]  # (c, b)
                    acc = prod if acc is None else acc.__iadd__(prod)
                else:
                    out = bufs[0 if acc is None else 1][: hi - lo]
                    np.matmul(part, C[at : at + b], out=out)
                    acc = out if acc is None else acc.__iadd__(out)
                at += b
            yield lo, hi, self._host(acc)

    def subtract(self, R: np.ndarray, C: np.ndarray) -> None:
        """R -= K @ C in place, R (D, b), C (used, b)."""
        for lo, hi, KC in self._times_chunks(C):
            R[lo:hi] -= KC

    def times(self, Q: np.ndarray, write: Callable[[int, int, np.ndarray], None]) -> None:
        """K @ Q (D, k) chunk by chunk: write(lo, hi, rows) gets each (c, k) chunk once, in order."""
        for lo, hi, KQ in self._times_chunks(Q):
            write(lo, hi, KQ)


class _BlockFile:
    """A block of K on disk filled by row ranges: `block[lo:hi] = rows` writes the rows where chunks() reads
    them (row-major, `width` columns)."""

    def __init__(self, f, width: int):
        self.fd, self.width = f.fileno(), width

    def __setitem__(self, rows: slice, value: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(value, dtype=np.float32).reshape(-1)).cast("B")
        done, offset = 0, 4 * rows.start * self.width
        while done < len(data):  # pwrite may write fewer bytes than asked
            done += os.pwrite(self.fd, data[done:], offset + done)
