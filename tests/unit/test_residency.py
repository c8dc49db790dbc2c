"""host/residency.py and RamCache.trim against this very process and the real page cache.

The kernel is the thing under test (no fake): the pages a process maps are found from its page
tables, and a page dropped from the page cache is one ``mincore`` no longer finds, while a page
a process maps is kept. The files are on the data disk's file system (the tests' temporary
directory), where the page cache can let go of a page; tmpfs cannot.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from support.pagecache import resident

from tenkibox.artifacts import ramfile
from tenkibox.artifacts.store import LocalArtifactStore
from tenkibox.engine.pagemap import PagemapError
from tenkibox.host import residency
from tenkibox.host.ramcache import RamCache

P = residency.PAGE
def _page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * P


def _data_file(path: Path, n: int) -> Path:
    """``n`` pages, each in the page cache, clean. Written a page at a time: the page cache
    then holds one-page folios (a large folio is dropped whole or not at all, which makes a
    real cache's trim coarser, never wrong)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(n):
            os.pwrite(fd, _page(i), i * P)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return path


def test_the_pages_a_process_read_or_wrote_are_the_ones_found(tmp_path: Path) -> None:
    f = _data_file(tmp_path / "ram", 128)
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 128 * P, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert residency.touched(os.getpid(), f) == bytes(128)
        _ = m[0]
        _ = m[40 * P + 7]
        m[80 * P:80 * P + 2] = b"hi"
        seen = residency.touched(os.getpid(), f)
        assert len(seen) == 128
        marked = {i for i, v in enumerate(seen) if v}
        assert {0, 40, 80} <= marked
        # a fault may map neighbours it finds cached, within its 64 KiB window
        assert all(min(abs(i - t) for t in (0, 40, 80)) < 16 for i in marked), marked
    finally:
        m.close()


def test_a_process_that_does_not_map_the_file_is_an_error(tmp_path: Path) -> None:
    f = _data_file(tmp_path / "ram", 8)
    with pytest.raises(PagemapError):
        residency.touched(os.getpid(), f)


def test_dropping_keeps_the_used_pages_and_those_a_process_maps(tmp_path: Path) -> None:
    f = _data_file(tmp_path / "ram", 64)
    assert resident(f) == set(range(64))
    used = bytearray(64)
    used[0:8] = b"\1" * 8
    used[30] = 1
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 64 * P, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        _ = m[50 * P]  # mapped by this process (with neighbours): the kernel keeps them
        mapped = {i for i, v in enumerate(residency.touched(os.getpid(), f)) if v}
        assert 50 in mapped and 20 not in mapped
        advised = residency.drop_unused(f, bytes(used))
        assert advised == (64 - 9) * P
        assert resident(f) == {*range(8), 30} | mapped
    finally:
        m.close()
    # the data is all there, read back from the disk
    assert f.read_bytes() == b"".join(_page(i) for i in range(64))


def test_union_of_page_maps() -> None:
    assert residency.union(b"\0\1\0\0", b"\1\0\0\1") == b"\1\1\0\1"
    with pytest.raises(ValueError):
        residency.union(b"\0", b"\0\0")


def test_a_cache_keeps_what_its_clones_used_since_its_last_trim(tmp_path: Path) -> None:
    cache = RamCache(tmp_path / "ram-cache", LocalArtifactStore(tmp_path / "artifacts"))
    cache.root.mkdir()
    digest = "ab" * 32
    f = _data_file(cache.path(digest), 64)
    # no clone seen yet: nothing is dropped
    assert cache.trim(digest) == 0
    assert resident(f) == set(range(64))
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 64 * P, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        _ = m[3 * P]
        m[20 * P] = 1
        cache.note_used(digest, [os.getpid(), 2 ** 22 + 7])  # the second is no process
        used = residency.touched(os.getpid(), f)
    finally:
        m.close()
    assert cache.trim(digest) > 0
    kept = resident(f)
    assert {3, 20} <= kept < set(range(64))
    assert kept == {i for i, v in enumerate(used) if v}
    # what was noted was used up by that trim: the next one, with no clone seen, keeps all
    _ = f.read_bytes()
    assert cache.trim(digest) == 0
    assert resident(f) == set(range(64))


def test_an_unpacked_cache_lets_go_of_less_than_a_frame(tmp_path: Path) -> None:
    """A frame holds up to 1 MiB; the cache is written in smaller pieces, so that a page cache
    with large folios can drop the unused part of a frame (written whole, it kept all 4 MiB)."""
    src, packed, cache = tmp_path / "ram", tmp_path / "ram.zst", tmp_path / "cache"
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        os.pwrite(f.fileno(), os.urandom(4 << 20), 1 << 20)
    ramfile.pack(src, packed)
    ramfile.unpack_chain([packed], cache)
    n = residency.pages(8 << 20)
    used = bytearray(n)
    used[256::64] = b"\1" * len(used[256::64])  # a page in every 256 KiB
    residency.drop_unused(cache, bytes(used))
    assert len(resident(cache)) <= (4 << 20) // P // 2
    assert cache.read_bytes() == src.read_bytes()
