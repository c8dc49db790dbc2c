"""RAM images of a lineage (``ramfile`` version 2): a delta over a parent holds only the chunks
that changed, zero frames where data went away, and an index of the composed RAM; a chain
composes into the final RAM; damage is refused as ``RamFormatError``; the cache of a chain is
built, checked against the index, and rebuilt by the scrub."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings

from tenkibox.artifacts import ramfile
from tenkibox.artifacts.store import LocalArtifactStore
from tenkibox.host import ramcache
from tenkibox.host.api import CacheScrub
from tenkibox.host.ramcache import RamCache
from tenkibox.host.restore import device_state_file

MiB = 1 << 20
C = ramfile.DELTA_CHUNK
SIZE = 32 * MiB


def _ram(path: Path, pieces: dict[int, bytes], base: Path | None = None) -> Path:
    """A sparse RAM file: ``base``'s content (if any) with ``pieces`` written over it."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        if base is not None:
            with open(base, "rb") as b:
                for off, n in list(ramfile.data_extents(b.fileno(), SIZE)):
                    os.pwrite(f.fileno(), os.pread(b.fileno(), n, off), off)
        for off, data in pieces.items():
            os.pwrite(f.fileno(), data, off)
    return path


def _same(a: Path, b: Path) -> bool:
    """Equal as RAM: holes and zeros alike."""
    return a.read_bytes() == b.read_bytes()


def _lineage(tmp_path: Path) -> list[tuple[Path, ramfile.Packed, Path]]:
    """Three generations: a full image, a small change, a change that also zeroes a region."""
    r1 = _ram(tmp_path / "r1", {0: os.urandom(4 * MiB), 10 * MiB: b"kernel" * 50000,
                                20 * MiB: os.urandom(MiB)})
    r2 = _ram(tmp_path / "r2", {5: b"changed", 12 * MiB: os.urandom(3 * C)}, base=r1)
    r3 = _ram(tmp_path / "r3", {20 * MiB: bytes(MiB), 30 * MiB + 4096: b"new"}, base=r2)
    out = []
    parent: tuple[Path, str] | None = None
    for i, r in enumerate((r1, r2, r3), 1):
        img = tmp_path / f"img{i}"
        got = ramfile.pack_delta(r, img, *(parent or (None, None)))
        out.append((r, got, img))
        parent = (img, got.digest)
    return out


def test_a_delta_against_the_parents_ram_at_hand_is_the_same_image(tmp_path: Path) -> None:
    """A restored VM's RAM cache is its parent's RAM composed: chunks equal to it take the
    parent's index entries unhashed, and the image written is byte for byte the same (also
    where a chunk went back to zero, or changed inside an otherwise equal window)."""
    (r1, p1, i1), (r2, p2, i2), (r3, p3, _) = _lineage(tmp_path)
    for r, parent, digest, ram, want in ((r2, i1, p1.digest, r1, p2),
                                         (r3, i2, p2.digest, r2, p3)):
        got = ramfile.pack_delta(r, tmp_path / "again", parent, digest, parent_ram=ram)
        assert got == want
    # a parent RAM of another size is not used (the result is still right)
    other = _ram(tmp_path / "short", {})
    os.truncate(other, SIZE - C)
    assert ramfile.pack_delta(r2, tmp_path / "again", i1, p1.digest, parent_ram=other) == p2


def test_a_delta_holds_only_what_changed_and_the_chain_composes(tmp_path: Path) -> None:
    (r1, p1, i1), (r2, p2, i2), (r3, p3, i3) = _lineage(tmp_path)
    assert p1.changed == p1.raw  # a full image
    assert p2.changed == 4 * C  # the chunk of offset 5, and the 3 new ones
    assert p3.changed == C  # the new chunk at 30 MiB; the zeroed MiB is zero frames
    assert p2.stored < p1.stored / 10 and p3.stored < p1.stored / 20
    assert ramfile.header(i2).parent == p1.digest and ramfile.header(i1).parent is None
    # the zeroed MiB: one zero frame (adjacent chunks together)
    assert [(off, n) for off, n, d in ramfile.records(i3) if d is None] == [(20 * MiB, MiB)]
    # adjacent changed chunks are one frame: the 3 new chunks at 12 MiB
    assert [(off, n) for off, n, d in ramfile.records(i2)] == [(0, C), (12 * MiB, 3 * C)]
    for n, r in ((1, r1), (2, r2), (3, r3)):
        out = tmp_path / f"out{n}"
        chain = [i1, i2, i3][:n]
        ramfile.unpack_chain(chain, out, [p1.digest, p2.digest, p3.digest][:n])
        assert _same(out, r), n
        assert ramfile.read_index([i1, i2, i3][n - 1]) == ramfile.file_index(r)
    # the zeroed region is a hole again, not zeros written
    out = tmp_path / "out3"
    assert os.stat(out).st_blocks * 512 < os.stat(tmp_path / "out2").st_blocks * 512


def test_a_chain_out_of_order_or_with_a_gap_is_refused(tmp_path: Path) -> None:
    (_, p1, i1), (_, _, i2), (_, p3, i3) = _lineage(tmp_path)
    with pytest.raises(ramfile.RamFormatError, match="without its parent"):
        ramfile.unpack_chain([i2, i3], tmp_path / "x")
    with pytest.raises(ramfile.RamFormatError, match="not a delta over"):
        ramfile.unpack_chain([i1, i3], tmp_path / "x", [p1.digest, p3.digest])
    with pytest.raises(ramfile.RamFormatError, match="full image inside"):
        ramfile.unpack_chain([i1, i1], tmp_path / "x")


def test_version_1_images_still_read(tmp_path: Path) -> None:
    r = _ram(tmp_path / "r", {3 * MiB + 17: os.urandom(2 * MiB), 0: b"boot"})
    img = tmp_path / "v1"
    ramfile.pack(r, img)
    assert ramfile.header(img).version == 1
    ramfile.unpack_chain([img], tmp_path / "out")
    assert _same(tmp_path / "out", r)
    with pytest.raises(ramfile.RamFormatError, match="no index"):
        ramfile.read_index(img)


@pytest.mark.parametrize("where", ["index-count", "index-entry", "footer", "frame-header",
                                   "frame-data", "truncated"])
def test_a_damaged_image_is_refused_never_a_memory_error(tmp_path: Path, where: str) -> None:
    (_, _, i1), (_, _, i2), _ = _lineage(tmp_path)
    data = bytearray(i2.read_bytes())
    at = int.from_bytes(data[-16:-8], "little")
    head = len(ramfile.MAGIC2) + ramfile.HEAD2.size
    if where == "index-count":
        data[at:at + 8] = (1 << 62).to_bytes(8, "little")
    elif where == "index-entry":
        data[at + 8:at + 12] = ((1 << 32) - 1).to_bytes(4, "little")  # past the RAM
    elif where == "footer":
        data[-16:-8] = (len(data) * 4).to_bytes(8, "little")
    elif where == "frame-header":
        data[head + 8:head + 16] = (1 << 60).to_bytes(8, "little")  # raw length
    elif where == "frame-data":
        data[head + ramfile.FRAME.size + 4] ^= 0xFF
    else:
        del data[len(data) // 2:]
    i2.write_bytes(bytes(data))
    with pytest.raises(ramfile.RamFormatError):
        ramfile.read_index(i2)
        ramfile.unpack_chain([i1, i2], tmp_path / "x")


def test_a_parent_of_another_size_is_refused(tmp_path: Path) -> None:
    (_, p1, i1), _, _ = _lineage(tmp_path)
    other = tmp_path / "other"
    with open(other, "wb") as f:
        f.truncate(2 * SIZE)
        f.write(b"x")
    with pytest.raises(ramfile.RamFormatError, match="another RAM size"):
        ramfile.pack_delta(other, tmp_path / "img", i1, p1.digest)


@pytest.fixture(params=[ramfile.XXH3, ramfile.BLAKE2B])
def chain(tmp_path: Path, request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> tuple[RamCache, list[str], Path]:
    """A lineage in a store, its index hashed with XXH3 (new lineages) or with blake2b (those
    begun before XXH3)."""
    with monkeypatch.context() as m:
        m.setattr(ramfile, "NEW_HASH", request.param)
        made = _lineage(tmp_path)
    assert {ramfile.header(img).hash for _, _, img in made} == {request.param}
    store = LocalArtifactStore(tmp_path / "store")
    digests = []
    last: Path = tmp_path
    for r, got, img in made:
        assert store.put(img, digest=got.digest) == got.digest
        digests.append(got.digest)
        last = r
    return RamCache(tmp_path / "ram-cache", store), digests, last


async def test_the_cache_of_a_chain_is_the_final_ram(
        chain: tuple[RamCache, list[str], Path]) -> None:
    cache, digests, final = chain
    assert cache.chain(digests[-1]) == digests
    path = await cache.ensure(digests[-1])
    assert path == cache.path(digests[-1]) and _same(path, final)
    assert cache.scrub(repair=False) == CacheScrub()


async def test_a_cache_is_on_disk_before_anything_vouches_for_it(
        chain: tuple[RamCache, list[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The unpacked file is synced before its rename (which also writes it back before a trim
    would, beside the next restores), its meta before its own, and the directory after."""
    cache, digests, final = chain
    path, meta = cache.path(digests[-1]), cache.root / f"{digests[-1]}.meta"
    synced: list[tuple[str, int, bool, bool]] = []
    real = ramcache.fsync_path

    def fsync(p: Path) -> None:
        size = p.stat().st_size if p.is_file() else -1
        synced.append((p.name, size, path.exists(), meta.exists()))
        real(p)

    monkeypatch.setattr(ramcache, "fsync_path", fsync)
    assert await cache.ensure(digests[-1]) == path
    unpacked, meta_tmp, directory = synced
    assert unpacked[0].startswith(f".{path.name}.") and unpacked[1:] == (
        final.stat().st_size, False, False)
    assert meta_tmp[0].startswith(f".{meta.name}.") and meta_tmp[2:] == (True, False)
    assert directory == (cache.root.name, -1, True, True)


async def test_the_scrub_checks_a_chain_cache_against_the_index(
        chain: tuple[RamCache, list[str], Path]) -> None:
    cache, digests, final = chain
    path = await cache.ensure(digests[-1])
    with open(path, "r+b") as f:
        f.seek(12 * MiB + 100)
        b = f.read(1)
        f.seek(12 * MiB + 100)
        f.write(bytes([b[0] ^ 1]))
    found = cache.scrub(repair=False)
    assert list(found.damaged) == [digests[-1]]
    assert cache.scrub(repair=True) == CacheScrub(rebuilt=[digests[-1]])
    assert _same(path, final)


async def test_a_chain_with_a_missing_parent_is_not_built(
        chain: tuple[RamCache, list[str], Path]) -> None:
    cache, digests, _ = chain
    cache.store.local_path(digests[1]).unlink()
    with pytest.raises(Exception, match=r"missing|No such"):
        await cache.ensure(digests[-1])
    assert not cache.path(digests[-1]).exists()


def test_a_parent_of_another_chunk_is_refused_and_a_full_image_compresses_as_v1(
        tmp_path: Path) -> None:
    r = _ram(tmp_path / "r", {0: b"abc" * 400000, 9 * MiB: os.urandom(MiB)})
    full = ramfile.pack_delta(r, tmp_path / "full", chunk=1 << 16)
    with pytest.raises(ramfile.RamFormatError, match="another chunk size"):
        ramfile.pack_delta(r, tmp_path / "d", tmp_path / "full", full.digest)
    _, v1_stored, _ = ramfile.pack(r, tmp_path / "v1")
    v2 = ramfile.pack_delta(r, tmp_path / "v2")
    # one frame per 1 MiB window, as version 1; only the index is more
    assert v2.stored <= v1_stored + 12 * (v2.raw // C) + 1024
    ramfile.unpack_chain([tmp_path / "v2"], tmp_path / "out")
    assert _same(tmp_path / "out", r)


def test_a_device_state_is_read_compressed_or_raw(tmp_path: Path) -> None:
    """Captures store the device state zstd-compressed; older snapshots' raw ones still load."""
    raw = b"QEVM" + os.urandom(1000) + bytes(100000)
    old = tmp_path / "old"
    old.write_bytes(raw)
    assert device_state_file(old, tmp_path / "scratch") == old
    assert not (tmp_path / "scratch").exists()
    new = tmp_path / "new"
    new.write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert new.stat().st_size < len(raw) / 10
    out = device_state_file(new, tmp_path / "scratch")
    assert out == tmp_path / "scratch" and out.read_bytes() == raw


def test_an_image_from_written_pages_is_the_ram_the_vm_holds(tmp_path: Path) -> None:
    """``pack_pages``: a restored VM's RAM is its cache with the pages it wrote over it. Full,
    as a delta over the cache's image, and as a delta over an earlier capture of the VM (some
    of whose pages went back to the cache's): each composes to that RAM with its index, and a
    delta stores the written chunks that differ only."""
    def rnd(n: int) -> bytes:
        return os.urandom(n)
    cache = _ram(tmp_path / "cache", {0: rnd(3 * C), 5 * MiB: rnd(MiB), 9 * MiB: rnd(C)})
    base_img = tmp_path / "base.img"
    base = ramfile.pack_delta(cache, base_img)
    base_index = ramfile.read_index(base_img)
    # the VM wrote: data over data, data over a hole, zeros over data, the same bytes again
    same = cache.read_bytes()[5 * MiB:5 * MiB + C]
    written = {C: rnd(C), 2 * MiB: rnd(2 * C), 9 * MiB: bytes(C), 5 * MiB: same}
    pages = _ram(tmp_path / "pages", written)
    ranges = sorted((off, off + len(d)) for off, d in written.items())
    want = _ram(tmp_path / "want", written, base=cache)

    full = ramfile.pack_pages(pages, ranges, cache, base_index, tmp_path / "full.img")
    ramfile.unpack_chain([tmp_path / "full.img"], tmp_path / "got-full")
    assert _same(tmp_path / "got-full", want)
    assert ramfile.read_index(tmp_path / "full.img") == ramfile.file_index(want)

    delta = ramfile.pack_pages(pages, ranges, cache, base_index, tmp_path / "delta.img",
                               base_img, base.digest)
    ramfile.unpack_chain([base_img, tmp_path / "delta.img"], tmp_path / "got-delta",
                         [base.digest, delta.digest])
    assert _same(tmp_path / "got-delta", want)
    assert ramfile.read_index(tmp_path / "delta.img") == ramfile.file_index(want)
    assert delta.changed == 3 * C  # C and the two at 2 MiB; not the same bytes, not the zeros
    assert delta.raw == full.raw == len(ramfile.file_index(want)) * C

    # an earlier capture of the VM wrote elsewhere, then the kernel gave that page back to
    # the cache (not written now): the new image puts the cache's bytes there again
    earlier = _ram(tmp_path / "earlier", {6 * MiB: rnd(C), 0: rnd(C)}, base=cache)
    e_img = tmp_path / "earlier.img"
    e = ramfile.pack_delta(earlier, e_img, base_img, base.digest)
    again = ramfile.pack_pages(pages, ranges, cache, base_index, tmp_path / "again.img",
                               e_img, e.digest)
    ramfile.unpack_chain([base_img, e_img, tmp_path / "again.img"], tmp_path / "got-again",
                         [base.digest, e.digest, again.digest])
    assert _same(tmp_path / "got-again", want)
    assert ramfile.read_index(tmp_path / "again.img") == ramfile.file_index(want)


def test_written_pages_must_be_whole_chunks_of_the_ram(tmp_path: Path) -> None:
    cache = _ram(tmp_path / "cache", {0: b"x" * C})
    pages = _ram(tmp_path / "pages", {})
    with pytest.raises(ValueError, match="whole chunks"):
        ramfile.pack_pages(pages, [(0, C // 2)], cache, {}, tmp_path / "out")
    small = tmp_path / "small"
    small.write_bytes(bytes(C))
    with pytest.raises(ramfile.RamFormatError, match="size"):
        ramfile.pack_pages(small, [], cache, {}, tmp_path / "out")


def test_a_lineage_keeps_the_hash_it_began_with(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A new lineage's index is XXH3 (``MAGIC3``); one begun with blake2b (``MAGIC2``, images
    written before XXH3) goes on with blake2b, so its deltas still find what is unchanged: by
    ``pack_delta`` and by ``pack_pages`` alike, each composing to its RAM with its index."""
    r1 = _ram(tmp_path / "r1", {0: os.urandom(2 * MiB), 9 * MiB: os.urandom(MiB)})
    new = ramfile.pack_delta(r1, tmp_path / "new.img")
    assert (tmp_path / "new.img").read_bytes()[:len(ramfile.MAGIC3)] == ramfile.MAGIC3
    assert ramfile.header(tmp_path / "new.img").hash == ramfile.XXH3
    assert ramfile.read_index(tmp_path / "new.img") == ramfile.file_index(r1, kind="xxh3")
    with monkeypatch.context() as m:  # what the code before XXH3 wrote
        m.setattr(ramfile, "NEW_HASH", ramfile.BLAKE2B)
        old = ramfile.pack_delta(r1, tmp_path / "old.img")
    old_img = tmp_path / "old.img"
    assert old_img.read_bytes()[:len(ramfile.MAGIC2)] == ramfile.MAGIC2
    assert old.raw == new.raw and old.digest != new.digest
    old_index = ramfile.read_index(old_img)
    assert old_index == ramfile.file_index(r1, kind="blake2b")
    assert old_index != ramfile.read_index(tmp_path / "new.img")

    # a delta by pack_delta: blake2b still, and only the changed chunk stored
    r2 = _ram(tmp_path / "r2", {7: b"changed"}, base=r1)
    d = ramfile.pack_delta(r2, tmp_path / "d.img", old_img, old.digest)
    assert ramfile.header(tmp_path / "d.img").hash == ramfile.BLAKE2B and d.changed == C
    ramfile.unpack_chain([old_img, tmp_path / "d.img"], tmp_path / "got-d",
                         [old.digest, d.digest])
    assert _same(tmp_path / "got-d", r2)
    assert ramfile.read_index(tmp_path / "d.img") == ramfile.file_index(r2, kind="blake2b")

    # a restored VM's written pages over that lineage's cache: the same
    written = {9 * MiB: os.urandom(C)}
    pages = _ram(tmp_path / "pages", written)
    ranges = [(9 * MiB, 9 * MiB + C)]
    p = ramfile.pack_pages(pages, ranges, r1, old_index, tmp_path / "p.img", old_img,
                           old.digest, index_hash=ramfile.BLAKE2B)
    assert ramfile.header(tmp_path / "p.img").hash == ramfile.BLAKE2B and p.changed == C
    want = _ram(tmp_path / "want", written, base=r1)
    ramfile.unpack_chain([old_img, tmp_path / "p.img"], tmp_path / "got-p",
                         [old.digest, p.digest])
    assert _same(tmp_path / "got-p", want)
    assert ramfile.read_index(tmp_path / "p.img") == ramfile.file_index(want, kind="blake2b")
    # an index and a parent hashed differently are refused, not mixed
    with pytest.raises(ramfile.RamFormatError, match="hashed with"):
        ramfile.pack_pages(pages, ranges, r1, old_index, tmp_path / "x.img",
                           tmp_path / "new.img", new.digest, index_hash=ramfile.BLAKE2B)


_PAGE_KINDS = ("random", "text", "zero", "cache")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_pages=st.dictionaries(st.integers(0, 511), st.sampled_from(_PAGE_KINDS[:3]),
                                   max_size=60),
       writes=st.lists(st.tuples(st.integers(0, 511), st.integers(1, 300),
                                 st.sampled_from(_PAGE_KINDS)), max_size=6),
       parent=st.sampled_from(("none", "cache", "earlier")),
       earlier_pages=st.dictionaries(st.integers(0, 511), st.sampled_from(_PAGE_KINDS[:3]),
                                     max_size=30))
def test_written_pages_compose_the_ram_whatever_their_ranges(
        cache_pages: dict[int, str], writes: list[tuple[int, int, str]], parent: str,
        earlier_pages: dict[int, str]) -> None:
    """``pack_pages`` against the RAM it stands for, over 2 MiB (two windows): ranges
    unsorted, overlapping or touching, across a window's end; written pages random,
    compressible, zero, or the cache's own bytes; full, as a delta over the cache's image, or
    over an earlier capture that differs from the cache. The image composes to that RAM, its
    index is that RAM's, and ``raw`` counts its non-zero chunks."""
    import tempfile

    size = 512 * C
    rng = random.Random(len(writes) * 7919 + len(cache_pages))

    def page(kind: str, cache: bytes, no: int) -> bytes:
        if kind == "random":
            return rng.randbytes(C)
        if kind == "text":
            return (f"page {no} ".encode() * C)[:C]
        if kind == "zero":
            return bytes(C)
        return cache[no * C:(no + 1) * C]

    def ram(path: Path, content: bytes) -> Path:
        with open(path, "wb") as f:
            f.truncate(size)
            for no in range(512):
                piece = content[no * C:(no + 1) * C]
                if piece != bytes(C):
                    os.pwrite(f.fileno(), piece, no * C)
        return path

    cache_bytes = bytearray(size)
    for no, kind in cache_pages.items():
        cache_bytes[no * C:(no + 1) * C] = page(kind, bytes(size), no)
    want = bytearray(cache_bytes)
    pages = bytearray(size)
    ranges: list[tuple[int, int]] = []
    for first, count, kind in writes:
        count = min(count, 512 - first)
        ranges.append((first * C, (first + count) * C))
        for no in range(first, first + count):
            data = page(kind, bytes(cache_bytes), no)
            want[no * C:(no + 1) * C] = pages[no * C:(no + 1) * C] = data
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cache = ram(d / "cache", bytes(cache_bytes))
        base = ramfile.pack_delta(cache, d / "base.img")
        base_index = ramfile.read_index(d / "base.img")
        chain: list[Path] = []
        digests: list[str] = []
        parent_img: Path | None = None
        parent_digest: str | None = None
        if parent == "cache":
            chain, digests = [d / "base.img"], [base.digest]
            parent_img, parent_digest = d / "base.img", base.digest
        elif parent == "earlier":
            earlier = bytearray(cache_bytes)
            for no, kind in earlier_pages.items():
                earlier[no * C:(no + 1) * C] = page(kind, bytes(cache_bytes), no)
            e = ramfile.pack_delta(ram(d / "earlier", bytes(earlier)), d / "e.img",
                                   d / "base.img", base.digest)
            chain, digests = [d / "base.img", d / "e.img"], [base.digest, e.digest]
            parent_img, parent_digest = d / "e.img", e.digest
        got = ramfile.pack_pages(ram(d / "pages", bytes(pages)), ranges, cache, base_index,
                                 d / "new.img", parent_img, parent_digest)
        ramfile.unpack_chain([*chain, d / "new.img"], d / "back", [*digests, got.digest])
        assert (d / "back").read_bytes() == bytes(want)
        want_index = ramfile.file_index(ram(d / "want", bytes(want)))
        assert ramfile.read_index(d / "new.img") == want_index
        assert got.raw == len(want_index) * C
        # each chunk stored once: data frames in offset order, none over another
        data = [(off, n) for off, n, b in ramfile.records(d / "new.img") if b is not None]
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(data))
        assert got.changed == sum(n for _, n in data)
        assert got.digest == hashlib.sha256((d / "new.img").read_bytes()).hexdigest()
        if parent == "cache":  # the parent's index given, as a capture after a restore does
            same = ramfile.pack_pages(d / "pages", ranges, cache, base_index, d / "same.img",
                                      parent_img, parent_digest, parent_index=base_index)
            assert same.digest == got.digest


def test_a_capture_s_copy_is_freed_as_it_is_packed(tmp_path: Path) -> None:
    """``free_pages``: the written pages' file holds no data once packed (its memory went back
    window by window), the image is the same as without; a parent refused before anything is
    read leaves the file whole (the capture then packs it again as a full image)."""
    cache = _ram(tmp_path / "cache", {0: os.urandom(2 * MiB)})
    base = ramfile.pack_delta(cache, tmp_path / "base.img")
    base_index = ramfile.read_index(tmp_path / "base.img")
    written = {MiB: os.urandom(3 * MiB), 8 * MiB + C: os.urandom(5 * C)}
    ranges = sorted((off, off + len(d)) for off, d in written.items())
    kept = ramfile.pack_pages(_ram(tmp_path / "kept", written), ranges, cache, base_index,
                              tmp_path / "kept.img", tmp_path / "base.img", base.digest)
    pages = _ram(tmp_path / "pages", written)
    other = _ram(tmp_path / "other-size", {})
    with open(other, "r+b") as f:
        f.truncate(SIZE * 2)
    odd = ramfile.pack_delta(other, tmp_path / "odd.img")
    with pytest.raises(ramfile.RamFormatError):
        ramfile.pack_pages(pages, ranges, cache, base_index, tmp_path / "x.img",
                           tmp_path / "odd.img", odd.digest, free_pages=True)
    assert pages.stat().st_blocks * 512 >= 3 * MiB + 5 * C
    freed = ramfile.pack_pages(pages, ranges, cache, base_index, tmp_path / "freed.img",
                               tmp_path / "base.img", base.digest, free_pages=True)
    assert freed.digest == kept.digest
    assert (tmp_path / "freed.img").read_bytes() == (tmp_path / "kept.img").read_bytes()
    assert pages.stat().st_blocks == 0
    assert pages.stat().st_size == SIZE


def test_an_image_goes_past_the_page_cache_or_through_it_in_small_pieces(
        tmp_path: Path) -> None:
    """Where the file system takes direct writes (the test's does), an image is written past
    the page cache, in aligned blocks, the tail cut back; elsewhere (a file that is no file
    here) through it, ``SINK_WRITE`` at most at a time. The bytes and the hash are the same."""
    bufs = [os.urandom(ramfile.DIRECT_BLOCK + 5), b"frame head",
            os.urandom(3 * ramfile.SINK_WRITE + 1), memoryview(os.urandom(100))[10:90]]
    whole = b"".join(bytes(b) for b in bufs)
    with open(tmp_path / "direct.img", "wb") as f, ramfile._Sink(f) as out:
        assert out.direct
        out.write(*bufs)
        assert out.sync() == len(whole)
    assert (tmp_path / "direct.img").read_bytes() == whole
    assert out.hexdigest() == hashlib.sha256(whole).hexdigest()

    sizes: list[int] = []

    class Recording(io.BytesIO):
        def write(self, b: Any) -> int:
            sizes.append(len(b))
            return super().write(b)

    mem = Recording()
    with ramfile._Sink(mem) as out:
        assert not out.direct
        out.write(*bufs)
    assert sizes and max(sizes) <= ramfile.SINK_WRITE
    assert mem.getvalue() == whole
    assert out.hexdigest() == hashlib.sha256(whole).hexdigest()


def test_a_failed_direct_write_reaches_the_packer(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the disk refuses (full, here made so) is raised by the next write or the sync,
    never lost in the sink's thread, and the thread still ends."""
    with open(tmp_path / "full.img", "wb") as f, ramfile._Sink(f) as out:
        assert out.direct

        def full(*_: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ramfile.os, "pwrite", full)
        out.write(os.urandom(ramfile.DIRECT_BLOCK))
        with pytest.raises(OSError, match="No space"):
            out.sync()
