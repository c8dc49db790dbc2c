"""engine/pagemap.py against this very process: a file mapped privately, some pages written.

The kernel's page tables are the thing under test (no fake): a page written through a private
mapping becomes the process's own, a page only read stays the file's.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from tenkibox.engine import pagemap

P = pagemap.PAGE


@pytest.mark.parametrize("threads", [False, True])
def test_the_pages_written_through_a_private_mapping_are_found_and_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: bool) -> None:
    if threads:  # a copy this small is done by one thread otherwise
        monkeypatch.setattr(pagemap, "SMALL", 0)
    f = tmp_path / "ram"
    size = 64 * P
    f.write_bytes(bytes(range(256)) * (size // 256))
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        addr = pagemap.find_mapping(os.getpid(), f, size)
        assert pagemap.written(os.getpid(), addr, size) == []
        _ = m[10 * P]  # read: still the file's page
        for page in (3, 4, 5, 40):
            m[page * P:page * P + 5] = b"dirty"
        ranges = pagemap.written(os.getpid(), addr, size)
        assert ranges == [(3 * P, 6 * P), (40 * P, 41 * P)]
        out = tmp_path / "copy"
        with pagemap.Target(out, size) as target:
            target.reserve(ranges[:1])  # the last page is reserved by the copy's own need
            assert pagemap.copy(os.getpid(), addr, ranges, target, step=P) == 4 * P
        got = out.read_bytes()
        assert got[3 * P:6 * P] == m[3 * P:6 * P] and got[40 * P:41 * P] == m[40 * P:41 * P]
        assert got[:3 * P] == bytes(3 * P)  # nothing else copied
        assert f.read_bytes()[3 * P:3 * P + 5] != b"dirty"  # the file is untouched
    finally:
        m.close()


def test_the_pages_touched_in_a_shared_memfd_are_found_through_its_fd_and_copied(
        tmp_path: Path) -> None:
    """A booted VM's RAM: a memfd mapped shared. A page read or written is one of the file's,
    an untouched one a hole; the memfd is found from the mapping, opened through /proc."""
    size = 64 * P
    fd = os.memfd_create("memory-backend-memfd", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            addr, path = pagemap.find_shared(os.getpid(), size)
            assert os.stat(path).st_ino == os.fstat(fd).st_ino
            assert pagemap.touched(path, size) == []
            _ = m[10 * P]  # a read of a hole allocates the page too
            for page in (3, 4, 5, 40):
                m[page * P:page * P + 5] = b"dirty"
            ranges = pagemap.touched(path, size)
            assert ranges == [(3 * P, 6 * P), (10 * P, 11 * P), (40 * P, 41 * P)]
            with pagemap.Target(tmp_path / "copy", size) as target:
                target.reserve(ranges)
                assert pagemap.copy(os.getpid(), addr, ranges, target) == 5 * P
            # the same out of the memfd mapped again (how a booted VM's pages are copied)
            with pagemap.Source(path, size) as source, \
                    pagemap.Target(tmp_path / "copy2", size) as target:
                source.populate(ranges)
                assert pagemap.copy_mapped(source, ranges, target, step=P) == 5 * P
            assert pagemap.touched(path, size) == ranges  # no hole was read (it would be filled)
            want = bytearray(size)  # every page touched, the holes zero
            for a, b in ranges:
                want[a:b] = m[a:b]
            assert (tmp_path / "copy").read_bytes() == want
            assert (tmp_path / "copy2").read_bytes() == want
            with pytest.raises(pagemap.PagemapError, match="no memfd"):
                pagemap.find_shared(os.getpid(), size + P)
        finally:
            m.close()
    finally:
        os.close(fd)


def test_a_mapping_that_is_not_there_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "ram"
    f.write_bytes(bytes(4 * P))
    with pytest.raises(pagemap.PagemapError, match="does not map"):
        pagemap.find_mapping(os.getpid(), f, 4 * P)
    with open(f, "r+b") as fh:  # shared: not a copy-on-write mapping
        m = mmap.mmap(fh.fileno(), 4 * P, mmap.MAP_SHARED)
    try:
        with pytest.raises(pagemap.PagemapError, match="privately"):
            pagemap.find_mapping(os.getpid(), f, 4 * P)
    finally:
        m.close()


def test_a_process_that_cannot_be_read_is_refused_before_anything_stops(tmp_path: Path) -> None:
    pagemap.readable(os.getpid(), id(tmp_path) & ~(P - 1))  # this process: fine
    with pytest.raises(pagemap.PagemapError, match="cannot read the memory"):
        pagemap.readable(os.getpid(), 0)  # nothing is mapped at 0
    with pagemap.Target(tmp_path / "t", 4 * P) as target, \
            pytest.raises(pagemap.PagemapError, match="cannot read the memory"):
        pagemap.copy(os.getpid(), 0, [(0, P)], target)


def test_a_copy_past_the_target_is_refused(tmp_path: Path) -> None:
    with pagemap.Target(tmp_path / "t", 2 * P) as target, \
            pytest.raises(pagemap.PagemapError, match="past the end"):
        pagemap.copy(os.getpid(), 0, [(P, 3 * P)], target)


def test_reserving_allocates_the_ranges_once(tmp_path: Path) -> None:
    with pagemap.Target(tmp_path / "t", 64 * P) as target:
        target.reserve([(0, 2 * P), (10 * P, 12 * P)])
        target.reserve([(P, 11 * P), (20 * P, 21 * P)])  # overlaps: only the rest is new
        assert target._reserved == [(0, 2 * P), (2 * P, 10 * P), (10 * P, 12 * P),
                                    (20 * P, 21 * P)]
        assert os.stat(tmp_path / "t").st_blocks * 512 == 13 * P
    assert target.address == 0  # unmapped


def test_a_close_while_a_copy_runs_unmaps_when_the_copy_ends(tmp_path: Path) -> None:
    target = pagemap.Target(tmp_path / "t", 4 * P)
    with target._use() as address:  # as copy() holds it, in a thread of its own
        target.close()
        assert target.address == address  # still mapped under the copy
        ctypes.memmove(address, b"still writable", 14)
    assert target.address == 0
    assert (tmp_path / "t").read_bytes()[:14] == b"still writable"
    with pytest.raises(pagemap.PagemapError, match="no longer mapped"):
        pagemap.copy(os.getpid(), 0, [(0, P)], target)
    target.close()  # twice: nothing more


@pytest.mark.parametrize(("ranges", "minus", "rest"), [
    ([], [(0, 10)], []),
    ([(0, 10)], [], [(0, 10)]),
    ([(0, 10)], [(0, 10)], []),
    ([(0, 10)], [(2, 4), (6, 8)], [(0, 2), (4, 6), (8, 10)]),
    ([(0, 10), (20, 30)], [(5, 25)], [(0, 5), (25, 30)]),
    ([(5, 6)], [(0, 1), (10, 11)], [(5, 6)]),
    ([(0, 4), (6, 9)], [(3, 7)], [(0, 3), (7, 9)]),
])
def test_subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]],
                  rest: list[tuple[int, int]]) -> None:
    assert pagemap.subtract(ranges, minus) == rest
