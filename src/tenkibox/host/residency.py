"""Which pages of a RAM cache stay in memory: the ones its clones use.

A RAM cache holds the whole RAM of a snapshot, unpacked on the data disk (``ramcache``). Right
after it is unpacked every page of it is in the page cache, and on a host with free memory
nothing evicts them. Yet a clone touches little of it: a 1 GiB guest whose snapshot held
384 MiB of data read or wrote ~55 MiB of it up to its first exec (issue 13), so ten clones
held 385 MiB of cache where ~75 MiB was used.

So the host learns which pages the clones use, from each clone's page tables (``pagemap.used``:
a page it read or wrote is there), and drops the others from the page cache with
``posix_fadvise(DONTNEED)``. The kernel drops only clean pages that no process maps: the cache
is written back when it is built (``ramcache``), and a trim writes back what is still dirty.
The data stays on disk: a clone that reads a dropped page reads it from there. Nothing here
changes the file, so its stat key and digest stay valid.

The page cache lets go of a folio only whole, so the cache is unpacked in small writes
(``ramfile.UNPACK_WRITE``). Measured on issue 13's bench (1 GiB guest with 256 MiB written, ten
clones): the cache held ~45 MiB instead of ~375 MiB, and a restore to its first exec was no
slower (a fault maps the neighbours it finds cached: fewer when fewer are).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..engine import pagemap

PAGE = pagemap.PAGE


def pages(size: int) -> int:
    return -(-size // PAGE)


def union(a: bytes, b: bytes) -> bytes:
    """Two page maps (one byte, 0 or 1, per page) of the same file, or-ed."""
    if len(a) != len(b):
        raise ValueError("page maps of different sizes")
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def touched(pid: int, path: Path) -> bytes:
    """One byte per page of the file at ``path``: 1 where process ``pid``, which maps all of it
    privately (a clone's QEMU), has that page (read or written). ``PagemapError`` when the
    process is gone, does not map the file (a cache rebuilt since is another file) or cannot be
    read."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise pagemap.PagemapError(f"cannot read {path.name}: {exc.strerror}") from exc
    return pagemap.used(pid, pagemap.find_mapping(pid, path, size), size)


def drop_unused(path: Path, used: bytes) -> int:
    """Write the file back, then drop from the page cache every page not marked in ``used``
    (pages a process maps stay: the kernel keeps them). Returns the bytes advised."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # only clean pages can be dropped (a cache is synced when built: this is cheap then)
        os.fdatasync(fd)
        advised = 0
        n = min(len(used), pages(os.fstat(fd).st_size))
        i = used.find(0, 0, n)
        while i >= 0:
            j = used.find(1, i, n)
            j = n if j < 0 else j
            os.posix_fadvise(fd, i * PAGE, (j - i) * PAGE, os.POSIX_FADV_DONTNEED)
            advised += (j - i) * PAGE
            i = used.find(0, j, n) if j < n else -1
        return advised
    finally:
        os.close(fd)
