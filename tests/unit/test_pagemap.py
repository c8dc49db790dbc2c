"""engine/pagemap.py against this very process: a file mapped privately, some pages written.

The kernel's page tables are the thing under test (no fake): a page written through a private
mapping becomes the process's own, a page only read stays the file's.
"""

from __future__ import annotations

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
        with open(out, "wb") as fo:
            fo.truncate(size)
            assert pagemap.copy(os.getpid(), addr, ranges, fo.fileno(), step=P) == 4 * P
        got = out.read_bytes()
        assert got[3 * P:6 * P] == m[3 * P:6 * P] and got[40 * P:41 * P] == m[40 * P:41 * P]
        assert got[:3 * P] == bytes(3 * P)  # nothing else copied
        assert f.read_bytes()[3 * P:3 * P + 5] != b"dirty"  # the file is untouched
    finally:
        m.close()


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
