"""The pages a process wrote in a private file mapping, found from its page tables; the pages
of a memfd it maps shared, found from the file.

A restored VM maps its snapshot's RAM cache privately: a page the guest (or a device) writes is
copied on write into the QEMU process's own anonymous memory, and every other page is still the
file's. So the guest's RAM is exactly the file plus the pages the process holds as anonymous,
which ``/proc/<pid>/pagemap`` tells apart (bit 63 present, bit 62 swapped, bit 61 a file page)
and ``process_vm_readv`` reads. No dirty tracking of QEMU's is involved: under TCG, QEMU 7.2's
costs a scan of every vCPU's TLB per dirty page at its first sync (seconds for a few GiB).

The copy (``Target``, ``copy``) is one memcpy per page, with the target's pages allocated and
mapped before the guest stops.

A page the kernel copied on write stays the process's: only a ``MADV_DONTNEED`` gives it back to
the file, and QEMU discards guest RAM only for a balloon or virtio-mem (neither is attached). A
swapped-out page is the process's too. A page that was not mapped when write tracking protected
it (``engine/writetrack.py``) holds a marker instead, shown as a swapped page of swap type 31:
no page at all, the file's.

A booted VM's RAM in a memfd (``find_shared``, ``touched``) holds a page from the guest's first
touch of it, read or written, on: the file's extents (``SEEK_DATA``) are its pages, swapped out
or not (a shared mapping's page tables lose a page that was swapped out), and the rest is zero.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import ctypes
import heapq
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

PAGE = 4096
ENTRY = 8
#: pagemap entries read at a time (2 MiB of entries for 1 GiB of mapping)
BATCH = 1 << 18
#: a copy this small is done by the calling thread alone
SMALL = 32 << 20

# byte 7 of an entry (little-endian u64): bit 7 present, bit 6 swapped, bit 5 file or shared
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
_ANON = bytes(1 if b & _PRESENT and not b & _FILE else 0 for b in range(256))
_MAPPED = bytes(1 if b & _PRESENT else 0 for b in range(256))
_SWAP = bytes(1 if b & _SWAPPED else 0 for b in range(256))
# byte 0 of a swapped entry: its swap type in bits 0-4 (shown to CAP_SYS_ADMIN only); type 31
# (SWP_PTE_MARKER) is a marker that userfaultfd's write protection left where no page was
MARKER_TYPE = 31
_REAL = bytes(0 if b & 0x1F == MARKER_TYPE else 1 for b in range(256))
_RUN = re.compile(b"\x01+")
#: how a memfd's mapping and its fd are named in /proc (``memfd_create``'s prefix)
MEMFD = "/memfd:"


class PagemapError(Exception):
    """The mapping is not there, or the process's page tables cannot be read."""


def _mappings(pid: int, perms: str, size: int) -> Iterator[tuple[int, list[str]]]:
    """(address, fields of its ``/proc/<pid>/maps`` line) of each mapping of ``pid`` with
    ``perms``, from its file's start, ``size`` bytes long."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise PagemapError(f"cannot read the mappings of process {pid}: {exc}") from exc
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1] != perms or int(parts[2], 16) != 0:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if end - start == size:
            yield start, parts


def find_mapping(pid: int, path: Path, size: int) -> int:
    """The address where ``pid`` maps ``path`` privately, writable, from its start, ``size``
    bytes long (a VM's guest RAM over its RAM cache); PagemapError if it does not."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PagemapError(f"cannot read the mappings of process {pid}: {exc}") from exc
    for start, parts in _mappings(pid, "rw-p", size):
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        if int(parts[4]) == st.st_ino and os.makedev(major, minor) == st.st_dev:
            return start
    raise PagemapError(f"process {pid} does not map {path.name} privately ({size} bytes)")


def _entries(pid: int, start: int, size: int) -> Iterator[tuple[int, bytes, bytes]]:
    """The pagemap entries of the mapping at ``start``, in batches: (first page, top byte of
    each entry, where the flags are, low byte of each, where a swapped one's type is)."""
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
            yield first, raw[7::ENTRY], raw[0::ENTRY]
    except OSError as exc:
        raise PagemapError(f"cannot read the page tables of process {pid}: {exc}") from exc
    finally:
        os.close(fd)


def _with_swapped(top: bytes, low: bytes, table: bytes) -> bytes:
    """One byte per entry: 1 where ``table`` says so of its flags, or where it is a page
    swapped out (not a marker), else 0."""
    swapped = top.translate(_SWAP)
    if b"\x01" not in swapped:
        return top.translate(table)
    n = len(top)
    # bytewise and/or of the three, as integers: a tracked VM's RAM is mostly markers
    got = int.from_bytes(top.translate(table), "little") | (
        int.from_bytes(swapped, "little") & int.from_bytes(low.translate(_REAL), "little"))
    return got.to_bytes(n, "little")


def written(pid: int, start: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, end)`` of the mapping at ``start`` whose pages the process
    holds as its own (written since it mapped the file), ascending; adjacent pages in one."""
    out: list[tuple[int, int]] = []
    for first, top, low in _entries(pid, start, size):
        for m in _RUN.finditer(_with_swapped(top, low, _ANON)):
            a, b = (first + m.start()) * PAGE, (first + m.end()) * PAGE
            if out and out[-1][1] == a:  # a run across two batches
                a = out.pop()[0]
            out.append((a, b))
    return out


def used(pid: int, start: int, size: int) -> bytes:
    """One byte per page of the mapping at ``start``: 1 where the process has the page, read
    or written (the file's page mapped, or its own copy; in memory or swapped), else 0."""
    return b"".join(_with_swapped(top, low, _MAPPED)
                    for _first, top, low in _entries(pid, start, size))


def find_shared(pid: int, size: int) -> tuple[int, Path]:
    """A booted VM's guest RAM, a memfd QEMU maps shared (``MachineConfig.ram_shared``): the
    address of that mapping, ``size`` bytes from the file's start, and a path that opens the
    memfd (``/proc/<pid>/fd/<n>``); PagemapError if ``pid`` has no such mapping."""
    for start, parts in _mappings(pid, "rw-s", size):
        if not parts[5].startswith(MEMFD):
            continue
        inode = int(parts[4])
        fds = Path(f"/proc/{pid}/fd")
        try:
            for link in fds.iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile, or not a file
                    if os.stat(link).st_ino == inode and os.readlink(link).startswith(MEMFD):
                        return start, link
        except OSError as exc:
            raise PagemapError(f"cannot read the files of process {pid}: {exc}") from exc
    raise PagemapError(f"process {pid} maps no memfd of {size} bytes shared")


def touched(path: Path, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, end)`` of a memfd (or any sparse file) that hold pages,
    ascending: a guest's RAM in a memfd allocates a page at its first touch, read or write,
    and a page swapped out is still one of the file's (where the page tables of a shared
    mapping no longer show it)."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PagemapError(f"cannot open {path}: {exc}") from exc
    try:
        pos = 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            b = min(os.lseek(fd, a, os.SEEK_HOLE), size)
            out.append((a - a % PAGE, -(-b // PAGE) * PAGE))
            pos = b
    except OSError as exc:
        raise PagemapError(f"cannot read the extents of {path}: {exc}") from exc
    finally:
        os.close(fd)
    return out


class _Mapping:
    """A file mapped shared into this process, ``size`` bytes from its start. Close it (or use
    it as a context manager) to unmap it: a close while a copy still runs (a capture cancelled
    meanwhile; the copy's threads cannot be stopped) unmaps it when that copy ends, never under
    it (a later mapping of this process could take the addresses the copy still writes)."""

    def __init__(self, path: Path, size: int, fd: int, prot: int) -> None:
        self.path, self.size = path, size
        self.address = 0
        self._mu = threading.Lock()  # guards the three below
        self._busy = 0
        self._closed = False
        if size:
            address = _LIBC.mmap(None, size, prot, _MAP_SHARED, fd, 0)
            if address in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise PagemapError(f"cannot map {path.name}: {os.strerror(err)}")
            self.address = address

    @contextlib.contextmanager
    def _use(self) -> Iterator[int]:
        """The mapping's address, mapped until the block ends whatever ``close`` meanwhile."""
        with self._mu:
            if self._closed:
                raise PagemapError(f"{self.path.name} is no longer mapped")
            self._busy += 1
        try:
            yield self.address
        finally:
            with self._mu:
                self._busy -= 1
                if self._closed and not self._busy:
                    self._unmap()

    def close(self) -> None:
        with self._mu:
            self._closed = True
            if not self._busy:
                self._unmap()

    def _unmap(self) -> None:
        if self.address:
            _LIBC.munmap(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size))
            self.address = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Target(_Mapping):
    """Where the written pages are copied to: a sparse file of the mapping's size, mapped shared
    into this process. ``reserve`` allocates the file's pages of the ranges known ahead and maps
    them (``MADV_POPULATE_WRITE``) while the guest still runs; the copy inside the stop is then
    a single memcpy per page out of the other process's memory into the file
    (``process_vm_readv``), where reading ``/proc/<pid>/mem`` into a buffer and writing that
    to the file copied twice: 1 GiB in 0.13 s instead of 0.22 s with two threads here."""

    def __init__(self, path: Path, size: int) -> None:
        self._reserved: list[tuple[int, int]] = []
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            super().__init__(path, size, fd, _PROT_RW)
        finally:
            os.close(fd)

    def reserve(self, ranges: list[tuple[int, int]]) -> None:
        """Allocate (``ENOSPC`` as an OSError, never a fault in the copy) and map the ranges
        not reserved yet: cheap for the few written since the first reservation."""
        new = subtract(ranges, self._reserved)
        if not new:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for a, b in new:
                os.posix_fallocate(fd, a, b - a)
        finally:
            os.close(fd)
        with self._use() as address:
            for a, b in new:  # a kernel without MADV_POPULATE_WRITE (< 5.14) faults them later
                _LIBC.madvise(ctypes.c_void_p(address + a), ctypes.c_size_t(b - a),
                              _MADV_POPULATE_WRITE)
        for r in new:  # usually a few, into many: no sort of them all (inside the stop)
            bisect.insort(self._reserved, r)

class Source(_Mapping):
    """A booted VM's memfd (``find_shared``), mapped read-only into this process: its pages
    copied with a memcpy from this mapping instead of ``process_vm_readv`` out of QEMU's
    (which pins each 4 KiB page of the other process first): 136 MiB of a booted guest in
    28-37 ms instead of 40-105 ms here (three runs each; a memcpy alone is ~5.5 GB/s on this
    machine). ``populate`` maps the pages known ahead, before the guest stops. Only pages the
    memfd holds are ever read (a read of a hole would allocate it)."""

    def __init__(self, path: Path, size: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PagemapError(f"cannot open {path}: {exc}") from exc
        try:
            super().__init__(path, size, fd, _PROT_READ)
        finally:
            os.close(fd)

    def populate(self, ranges: list[tuple[int, int]]) -> None:
        with self._use() as address:
            for a, b in ranges:  # a kernel without MADV_POPULATE_READ (< 5.14) faults them later
                _LIBC.madvise(ctypes.c_void_p(address + a), ctypes.c_size_t(b - a),
                              _MADV_POPULATE_READ)


def copy_mapped(source: Source, ranges: list[tuple[int, int]], target: Target,
                step: int = 4 << 20, workers: int = 2) -> int:
    """``copy``, out of a ``Source`` mapped here: the ranges must be ones the source holds."""
    pieces = _pieces(ranges, step, target, source.size)
    with source._use() as src, target._use() as dst:

        def one(a: int, b: int) -> None:
            ctypes.memmove(dst + a, src + a, b - a)  # releases the GIL

        return _each(pieces, one, workers)


def _pieces(ranges: list[tuple[int, int]], step: int, target: Target,
            end: int | None = None) -> list[tuple[int, int]]:
    """The ranges cut into pieces of at most ``step``; none may pass ``target``'s end (or
    ``end``)."""
    pieces = [(off, min(b, off + step)) for a, b in ranges for off in range(a, b, step)]
    if pieces and pieces[-1][1] > min(target.size, end if end is not None else target.size):
        raise PagemapError(f"a copy past the end of {target.path.name}")
    return pieces


def _each(pieces: list[tuple[int, int]], one: Callable[[int, int], None], workers: int) -> int:
    """``one`` of every piece, in ``workers`` threads (the stopped guest leaves the cores
    free) unless the copy is small; returns the bytes copied."""
    if workers < 2 or sum(b - a for a, b in pieces) < SMALL:  # threads cost more
        for a, b in pieces:
            one(a, b)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers, "pagemap-copy") as pool:
            list(pool.map(lambda piece: one(*piece), pieces))
    return sum(b - a for a, b in pieces)


def subtract(ranges: list[tuple[int, int]],
             minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` outside ``minus`` (both ascending, non-overlapping)."""
    out: list[tuple[int, int]] = []
    j = 0
    for a, b in ranges:
        # the first of ``minus`` that ends past ``a`` (a few new pages against all of them:
        # inside a capture's stop)
        j = bisect.bisect_right(minus, a, lo=j, key=_end)
        k = j
        while a < b:
            if k >= len(minus) or minus[k][0] >= b:
                out.append((a, b))
                break
            if minus[k][0] > a:
                out.append((a, minus[k][0]))
            a = max(a, minus[k][1])
            k += 1
    return out


def _end(r: tuple[int, int]) -> int:
    return r[1]


def union(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges in any of ``lists`` (each ascending, non-overlapping), ascending; adjacent
    and overlapping ones in one."""
    given = [r for r in lists if r]
    if len(given) <= 1:
        return list(given[0]) if given else []
    out: list[tuple[int, int]] = []
    for a, b in heapq.merge(*given):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def readable(pid: int, start: int) -> None:
    """PagemapError unless this process may read ``pid``'s memory (as the copy will)."""
    buf = ctypes.create_string_buffer(PAGE)
    _read(pid, ctypes.addressof(buf), start, PAGE)


def _read(pid: int, local: int, remote: int, n: int) -> None:
    lv, rv = _IoVec(local, n), _IoVec(remote, n)
    got = _LIBC.process_vm_readv(pid, ctypes.byref(lv), 1, ctypes.byref(rv), 1, 0)
    if got != n:
        why = os.strerror(ctypes.get_errno()) if got < 0 else f"{got} of {n} bytes"
        raise PagemapError(f"cannot read the memory of process {pid} at {remote:#x}: {why}")


def copy(pid: int, start: int, ranges: list[tuple[int, int]], target: Target,
         step: int = 4 << 20, workers: int = 2) -> int:
    """Copy the ranges of the mapping at ``start`` into ``target`` at the same offsets; returns
    the bytes copied. The process must not run meanwhile (a stopped VM), else a page may
    change under the copy. ``workers`` threads (the stopped guest leaves the cores free)."""
    pieces = _pieces(ranges, step, target)
    with target._use() as address:

        def one(a: int, b: int) -> None:
            _read(pid, address + a, start + a, b - a)

        return _each(pieces, one, workers)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_LIBC.process_vm_readv.restype = ctypes.c_ssize_t
_LIBC.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_PROT_READ, _PROT_RW, _MAP_SHARED = 0x1, 0x3, 0x01
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23
_MAP_FAILED = ctypes.c_void_p(-1).value
