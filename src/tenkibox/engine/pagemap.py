"""The pages a process wrote in a private file mapping, found from its page tables.

A restored VM maps its snapshot's RAM cache privately: a page the guest (or a device) writes is
copied on write into the QEMU process's own anonymous memory, and every other page is still the
file's. So the guest's RAM is exactly the file plus the pages the process holds as anonymous,
which ``/proc/<pid>/pagemap`` tells apart (bit 63 present, bit 62 swapped, bit 61 a file page)
and ``/proc/<pid>/mem`` reads. No dirty tracking of QEMU's is involved: under TCG, QEMU 7.2's
costs a scan of every vCPU's TLB per dirty page at its first sync (seconds for a few GiB).

A page the kernel copied on write stays the process's: only a ``MADV_DONTNEED`` gives it back to
the file, and QEMU discards guest RAM only for a balloon or virtio-mem (neither is attached). A
swapped-out page is the process's too.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from pathlib import Path

PAGE = 4096
ENTRY = 8
#: pagemap entries read at a time (2 MiB of entries for 1 GiB of mapping)
BATCH = 1 << 18
#: a copy this small is done by the calling thread alone
SMALL = 32 << 20

# byte 7 of an entry (little-endian u64): bit 7 present, bit 6 swapped, bit 5 file or shared
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
_OWN = bytes(1 if (b & _SWAPPED) or (b & _PRESENT and not b & _FILE) else 0 for b in range(256))
_RUN = re.compile(b"\x01+")


class PagemapError(Exception):
    """The mapping is not there, or the process's page tables cannot be read."""


def find_mapping(pid: int, path: Path, size: int) -> int:
    """The address where ``pid`` maps ``path`` privately, writable, from its start, ``size``
    bytes long (a VM's guest RAM over its RAM cache); PagemapError if it does not."""
    try:
        st = os.stat(path)
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise PagemapError(f"cannot read the mappings of process {pid}: {exc}") from exc
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1] != "rw-p" or int(parts[2], 16) != 0:
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        if int(parts[4]) != st.st_ino or os.makedev(major, minor) != st.st_dev:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if end - start == size:
            return start
    raise PagemapError(f"process {pid} does not map {path.name} privately ({size} bytes)")


def written(pid: int, start: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, end)`` of the mapping at ``start`` whose pages the process
    holds as its own (written since it mapped the file), ascending; adjacent pages in one."""
    out: list[tuple[int, int]] = []
    pages = size // PAGE
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PagemapError(f"cannot read the page tables of process {pid}: {exc}") from exc
    try:
        for first in range(0, pages, BATCH):
            n = min(BATCH, pages - first)
            raw = os.pread(fd, n * ENTRY, (start // PAGE + first) * ENTRY)
            if len(raw) != n * ENTRY:
                raise PagemapError(f"process {pid}'s page tables end early")
            for m in _RUN.finditer(raw[7::ENTRY].translate(_OWN)):
                a, b = (first + m.start()) * PAGE, (first + m.end()) * PAGE
                if out and out[-1][1] == a:  # a run across two batches
                    a = out.pop()[0]
                out.append((a, b))
    except OSError as exc:
        raise PagemapError(f"cannot read the page tables of process {pid}: {exc}") from exc
    finally:
        os.close(fd)
    return out


def copy(pid: int, start: int, ranges: list[tuple[int, int]], out_fd: int,
         step: int = 4 << 20, workers: int = 2) -> int:
    """Copy the ranges of the mapping at ``start`` into ``out_fd`` at the same offsets (a sparse
    file of the mapping's size); returns the bytes copied. The process must not run meanwhile
    (a stopped VM), else a page may change under the copy. ``workers`` threads (the stopped
    guest leaves the cores free: 2 copy 1 GiB in 0.3 s here, 1 in 0.5 s), each through a
    buffer of its own."""
    pieces = [(off, min(b, off + step)) for a, b in ranges for off in range(a, b, step)]
    local = threading.local()
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PagemapError(f"cannot read the memory of process {pid}: {exc}") from exc

    size = max((b - a for a, b in pieces), default=0)

    def one(piece: tuple[int, int]) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(size))
        a, b = piece
        view = buf[:b - a]
        if os.preadv(fd, [view], start + a) != b - a:
            raise PagemapError(f"process {pid}'s memory ends early at {a}")
        if os.pwrite(out_fd, view, a) != b - a:
            raise PagemapError(f"a short write of the copy at {a}")
        return b - a

    try:
        if workers < 2 or sum(b - a for a, b in pieces) < SMALL:  # threads cost more
            return sum(map(one, pieces))
        with concurrent.futures.ThreadPoolExecutor(workers, "pagemap-copy") as pool:
            return sum(pool.map(one, pieces))
    except OSError as exc:
        raise PagemapError(f"cannot read the memory of process {pid}: {exc}") from exc
    finally:
        os.close(fd)
