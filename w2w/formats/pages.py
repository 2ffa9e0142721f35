"""Handing back the pages of a memory-mapped file once they are read.

Pages of a file read through a memory map stay mapped, and count in the process's resident set, until the map
is closed: reading a 4 GB basis or a 26 GB matrix through one would show the whole file as the process's
memory. Clean pages of a file can be dropped from the mapping at any time (madvise(MADV_DONTNEED)): a later
read faults them in from the file again. Linux only; elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range's pages in, in one call (older kernels refuse it: EINVAL)

# madvise on an address range (Python's mmap.madvise needs the mmap object, which torch's loader keeps to itself)
_MADVISE = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None


def give_back(a, path: Path | str | None = None) -> bool:
    """Drop this process's mapping of the file pages under `a` (a contiguous numpy array or torch tensor whose
    values were already used or copied); whether anything was dropped.

    Only where /proc/self/maps shows a's memory in one mapping of a file: of `path` when given (the caller
    knows it only read there), else of any file mapped shared and read-only, whose pages cannot hold writes (a
    private read-only mapping may have been written before it was made read-only: a library's). On memory
    that is not a file's, or a private mapping written to, the same call would lose data. Pages shared with a
    neighbouring slice are kept (the range is rounded inwards to whole pages)."""
    if _MADVISE is None:
        return False
    if hasattr(a, "data_ptr"):  # a torch tensor
        if not a.is_contiguous() or not a.numel():
            return False
        start, nbytes = a.data_ptr(), a.numel() * a.element_size()
    else:
        if not a.flags.c_contiguous or not a.size:
            return False
        start, nbytes = a.ctypes.data, a.nbytes
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or not _droppable(start, start + nbytes, path):
        return False
    return _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED) == 0


def populate(a) -> bool:
    """Map the file pages under `a` (a numpy array over a memory map) into this process in one call, reading
    any that are not in the page cache; whether it was done. Faulted in page by page by BLAS's threads (64 kB a
    fault), a product over a mapped block ran ~4% slower than populated first (/tmp one-off, medians of 4)."""
    if _MADVISE is None or not a.size:
        return False
    lo = a.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    hi = a.ctypes.data + a.nbytes
    return _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_READ) == 0


def _droppable(start: int, end: int, path: Path | str | None) -> bool:
    """Whether [start, end) lies in one file mapping: of `path`, or with `path` None, a shared read-only one."""
    try:
        maps = Path("/proc/self/maps").read_bytes()  # bytes: a mapped file's name need not be UTF-8
    except OSError:
        return False
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [pathname]
        lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
        if lo <= start < hi:
            if end > hi or len(fields) < 6 or fields[4] == b"0":
                return False
            if path is not None:
                return fields[5] == os.fsencode(Path(path).resolve())
            return fields[1][1:2] == b"-" and fields[1][3:4] == b"s"  # read-only and shared: nothing written
    return False
