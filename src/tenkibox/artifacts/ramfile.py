"""Guest RAM on disk: the compressed, checksummed snapshot format.

A capture's RAM image is a sparse file as large as the configured memory, holding only the
pages that are not zero (the rest are holes). Two operations, proportional to those pages and
never to the configured size:

- ``pack``: after the guest runs again, compress the RAM image into the snapshot's ``ram.zst``
  (zero chunks are skipped, the rest is zstd, each chunk with its offset).
- ``unpack``: at restore, write the chunks back into a fresh sparse tmpfs file.

Format of ``ram.zst``: ``MAGIC``, then a little-endian u64 total size, then frames of
``(offset u64, raw length u64, compressed length u64, bytes)``, ending with an offset of
``END``.

Version 2 (``MAGIC2``, written by ``pack_delta``; version 1 is still read) makes a lineage of
snapshots incremental: an image may be a *delta* over a parent image (named by its sha256 in the
header), holding only the chunks (4 KiB: a guest page) that differ from the parent's composed
RAM, plus *zero frames* (compressed length 0: this range is zero now where the parent had
data). After the frames, an *index*: a hash of every non-zero chunk of the composed RAM (this
image applied over its whole chain). The next capture reads only its parent's index, never its
data, to know which chunks are unchanged; the scrub compares a cache with the index.

``MAGIC2``, u64 size, u64 chunk, 32-byte parent sha256 (zeros: a full image), frames as in
version 1 (offsets chunk-aligned, at most 1 MiB each) ending with ``END``, then the index (u64
count, then ``count`` x (u32 chunk number, 8-byte hash), ascending), then the footer (u64
offset of the index, ``INDEX_MAGIC``). The index's hash is blake2b under ``MAGIC2``, XXH3-64
under ``MAGIC3`` (otherwise the same layout): a new lineage (a full image) hashes with XXH3,
and a delta with its parent's hash, so that a lineage compares like with like.

Why these choices:
- 4 KiB chunks: a guest that runs between two captures dirties pages all over its memory
  (timers, slab, page tables, short-lived processes); at 64 KiB or 1 MiB a single dirty page
  costs the whole chunk. Frames still span runs of changed chunks within a 1 MiB window (over
  zero chunks too), so zstd sees large inputs and a full image compresses as version 1 does.
- 8-byte hashes: a chunk is only ever compared with the parent's chunk at the same offset, so a
  wrong "unchanged" needs a 2^-64 coincidence; the index costs 12 bytes per 4 KiB of touched
  RAM (0.3 %), read whole by the next capture.
- XXH3 for new lineages: a capture hashes every page it stores, and per 4 KiB page blake2b
  runs at ~740 MiB/s here against ~7 GiB/s for XXH3 (``bench``-style loop, one thread). Neither
  resists a guest that crafts a collision with its own parent page at the same offset (64 bits
  of blake2b cost ~2^32 tries); such a guest only spoils its own snapshot. The image's sha256
  still names and checks every byte of it.
- A frame whose samples do not compress (a guest's random or already compressed data) is
  written as a zstd frame of raw blocks (``compress_frame``): what zstd writes for it anyway,
  without the ~0.9 ms per MiB it spends finding that out. Readers see zstd frames only.
- The parent's digest in the header: a restore composes a chain only in the order the images
  were made (``unpack_chain``), and the cache can find the chain from the top image alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
import zstandard

MAGIC = b"TENKIRAM1\n"
MAGIC2 = b"TENKIRAM2\n"  # version 2, its index hashed with blake2b
MAGIC3 = b"TENKIRAM3\n"  # version 2's layout, its index hashed with XXH3-64
BLAKE2B, XXH3 = "blake2b", "xxh3"
_HASH_OF = {MAGIC2: BLAKE2B, MAGIC3: XXH3}
_MAGIC_OF = {BLAKE2B: MAGIC2, XXH3: MAGIC3}
#: the index hash of a new lineage (a full image); a delta keeps its parent's
NEW_HASH = XXH3
INDEX_MAGIC = b"TKRAMIDX"
DELTA_CHUNK = 1 << 12
HASH_LEN = 8
HEAD2 = struct.Struct("<QQ32s")
ENTRY = struct.Struct(f"<I{HASH_LEN}s")  # chunk number, hash
FOOTER = struct.Struct("<Q8s")
NO_PARENT = bytes(32)
#: the chunk sizes a version 2 image may have (powers of two, a page to a frame)
_CHUNKS = frozenset(1 << k for k in range(12, 21))
#: what a frame's compressed length may be at most for ``n`` raw bytes (zstd's bound, loosely)
def _clen_max(n: int) -> int:
    return n + n // 64 + 1024



END = (1 << 64) - 1
CHUNK = 1 << 20
FRAME = struct.Struct("<QQQ")
SIZE = struct.Struct("<Q")
_ZERO = bytes(CHUNK)


class RamFormatError(ValueError):
    pass


# -- frames zstd could not shrink ---------------------------------------------------------------
#: zstd's largest block (``ZSTD_BLOCKSIZE_MAX``)
_ZSTD_BLOCK = 128 << 10
#: a zstd frame's magic, then its header descriptor: one segment, the content size in 4 bytes
_ZSTD_HEAD = struct.pack("<IB", 0xFD2FB528, 0xA0)
#: the bytes of a frame sampled before it is compressed, and where: at the start, in the middle
#: and at the end
_SAMPLE = 4 << 10
#: samples that zstd cannot shrink below this share of their size mark a frame as incompressible
_INCOMPRESSIBLE = 0.97


def stored_frame(data: bytes | memoryview) -> bytes:
    """A zstd frame (RFC 8878) holding ``data`` (1 byte to 4 GiB) as raw blocks: what zstd
    itself writes for data it cannot shrink, made without trying to (``compress_frame``)."""
    view = memoryview(data)
    n = len(view)
    parts: list[bytes | memoryview] = [_ZSTD_HEAD, struct.pack("<I", n)]
    for at in range(0, n, _ZSTD_BLOCK):
        block = view[at:at + _ZSTD_BLOCK]
        last = at + _ZSTD_BLOCK >= n
        # block header: bit 0 the last block, bits 1-2 the type (0: raw), then the size
        parts.append((len(block) << 3 | last).to_bytes(3, "little"))
        parts.append(block)
    return b"".join(parts)


def compress_frame(comp: zstandard.ZstdCompressor, data: bytes | memoryview) -> bytes:
    """One frame's bytes, zstd-compressed; or stored as raw blocks when samples of it do not
    compress (a dirty guest's random or already compressed data).

    Why: zstd at level 1 spends ~0.9 ms per MiB here finding that random data does not
    compress (0.22 s for 256 MiB, on one core), to write it as raw blocks in the end. Three
    4 KiB samples cost ~1 % of that. A frame whose samples miss its compressible parts is
    stored larger than it could be, never wrong: any zstd decoder reads it."""
    n = len(data)
    if n >= 4 * _SAMPLE:
        view = memoryview(data)
        starts = (0, (n // 2) - (n // 2) % _SAMPLE, n - _SAMPLE)
        small = sum(len(comp.compress(view[a:a + _SAMPLE])) for a in starts)
        if small >= _INCOMPRESSIBLE * len(starts) * _SAMPLE:
            return stored_frame(view)
    return comp.compress(data)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated regions of a sparse file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def _chunks(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every chunk of the data extents, at most ``CHUNK`` long."""
    for off, length in data_extents(fd, size):
        pos = off
        while pos < off + length:
            n = min(CHUNK, off + length - pos)
            yield pos, n
            pos += n


def pack(src: Path, dst: Path, level: int = 1,
         workers: int | None = None) -> tuple[int, int, str]:
    """Compress sparse ``src`` into ``dst``; returns (non-zero bytes, stored bytes, sha256).

    Chunks are read and compressed by ``workers`` threads (zstd releases the GIL), a bounded
    number ahead of the one thread that writes them in offset order and hashes what it writes:
    a capture's compression uses every core instead of one."""
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    local = threading.local()
    raw_total = 0

    def compress(fd: int, pos: int, n: int) -> tuple[int, int, bytes | None]:
        chunk = os.pread(fd, n, pos)
        if chunk == _ZERO[:n]:
            return pos, n, None
        comp = getattr(local, "comp", None)
        if comp is None:
            comp = local.comp = zstandard.ZstdCompressor(level=level)
        return pos, n, compress_frame(comp, chunk)

    with open(src, "rb") as fin, open(dst, "wb") as fout, _Sink(fout) as out, \
            concurrent.futures.ThreadPoolExecutor(workers, "ram-pack") as pool:
        fd = fin.fileno()
        size = os.fstat(fd).st_size
        emit = out.write
        emit(MAGIC + SIZE.pack(size))
        ahead: collections.deque[concurrent.futures.Future[tuple[int, int, bytes | None]]] = \
            collections.deque()
        todo = _chunks(fd, size)
        while True:
            while len(ahead) < 4 * workers:
                nxt = next(todo, None)
                if nxt is None:
                    break
                ahead.append(pool.submit(compress, fd, *nxt))
            if not ahead:
                break
            pos, n, packed = ahead.popleft().result()
            if packed is not None:
                emit(FRAME.pack(pos, n, len(packed)), packed)
                raw_total += n
        emit(FRAME.pack(END, 0, 0))
        stored = out.sync()
    return raw_total, stored, out.hexdigest()


def frames(src: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(total size, offset, data)`` of every stored chunk of a version 1 RAM image, in offset
    order (a version 2 image: ``records``)."""
    dec = zstandard.ZstdDecompressor()
    with open(src, "rb") as fin:
        if fin.read(len(MAGIC)) != MAGIC:
            raise RamFormatError(f"{src.name}: not a tenki RAM image (version 1)")
        (size,) = SIZE.unpack(fin.read(SIZE.size))
        while True:
            head = fin.read(FRAME.size)
            if len(head) != FRAME.size:
                raise RamFormatError(f"{src.name}: truncated")
            off, n, clen = FRAME.unpack(head)
            if off == END:
                return
            # a damaged header must be refused before it sizes a buffer: pack never writes a
            # frame over CHUNK, nor one past the size, nor one that zstd grows
            if n > CHUNK or off + n > size or clen > n + CHUNK // 64 + 1024:
                raise RamFormatError(f"{src.name}: corrupt frame header at offset {off}")
            try:
                data = dec.decompress(fin.read(clen), max_output_size=n)
            except zstandard.ZstdError as exc:
                raise RamFormatError(f"{src.name}: corrupt frame at offset {off}: {exc}") from exc
            if len(data) != n or off + n > size:
                raise RamFormatError(f"{src.name}: corrupt frame at offset {off}")
            yield size, off, data


def image_size(src: Path) -> int:
    return header(src).size


def unpack(src: Path, dst: Path) -> int:
    """Rebuild a sparse RAM file from a full RAM image (either version); returns the bytes
    written. A delta needs its chain: ``unpack_chain``."""
    return unpack_chain([src], dst)


# -- version 2: deltas over a parent, and the index ----------------------------------------------
@dataclass(frozen=True)
class Header:
    version: int
    size: int  # the guest RAM's size
    chunk: int  # the chunk of the frames (v1: at most CHUNK, unaligned) and of the index
    parent: str | None  # sha256 of the image this one is a delta over (v2), else None
    data_at: int  # where the frames begin
    hash: str = BLAKE2B  # what its index's entries are (v2)


def header(src: Path) -> Header:
    with open(src, "rb") as fin:
        magic = fin.read(len(MAGIC))
        if magic == MAGIC:
            raw = fin.read(SIZE.size)
            if len(raw) != SIZE.size:
                raise RamFormatError(f"{src.name}: truncated")
            return Header(1, SIZE.unpack(raw)[0], CHUNK, None, len(MAGIC) + SIZE.size)
        if magic not in _HASH_OF:
            raise RamFormatError(f"{src.name}: not a tenki RAM image")
        raw = fin.read(HEAD2.size)
        if len(raw) != HEAD2.size:
            raise RamFormatError(f"{src.name}: truncated")
        size, chunk, parent = HEAD2.unpack(raw)
        if chunk not in _CHUNKS or size % chunk or size // chunk >= 1 << 32:
            raise RamFormatError(f"{src.name}: corrupt header")
        return Header(2, size, chunk, None if parent == NO_PARENT else parent.hex(),
                      len(MAGIC2) + HEAD2.size, _HASH_OF[magic])


def records(src: Path) -> Iterator[tuple[int, int, bytes | None]]:
    """``(offset, length, data)`` of every frame of a RAM image of either version, in the
    order stored; ``data`` None for a zero frame (the range is zero in the composed RAM)."""
    head = header(src)
    if head.version == 1:
        for _size, off, data in frames(src):
            yield off, len(data), data
        return
    dec = zstandard.ZstdDecompressor()
    end = _index_at(src)
    with open(src, "rb") as fin:
        fin.seek(head.data_at)
        while True:
            raw = fin.read(FRAME.size)
            if len(raw) != FRAME.size:
                raise RamFormatError(f"{src.name}: truncated")
            off, n, clen = FRAME.unpack(raw)
            if off == END:
                if fin.tell() != end:
                    raise RamFormatError(f"{src.name}: the frames do not end at the index")
                return
            # refused before it sizes a buffer (a damaged header must never be a MemoryError)
            if (n == 0 or n > CHUNK or off % head.chunk or off + n > head.size
                    or clen > _clen_max(n) or fin.tell() + clen > end):
                raise RamFormatError(f"{src.name}: corrupt frame header at offset {off}")
            if clen == 0:
                yield off, n, None
                continue
            try:
                data = dec.decompress(fin.read(clen), max_output_size=n)
            except zstandard.ZstdError as exc:
                raise RamFormatError(f"{src.name}: corrupt frame at offset {off}: {exc}") from exc
            if len(data) != n:
                raise RamFormatError(f"{src.name}: corrupt frame at offset {off}")
            yield off, n, data


def _index_at(src: Path) -> int:
    total = src.stat().st_size
    with open(src, "rb") as fin:
        if total < FOOTER.size:
            raise RamFormatError(f"{src.name}: truncated")
        fin.seek(total - FOOTER.size)
        at, magic = FOOTER.unpack(fin.read(FOOTER.size))
    if magic != INDEX_MAGIC or at > total - FOOTER.size - SIZE.size:
        raise RamFormatError(f"{src.name}: no index (truncated or damaged)")
    return int(at)


def read_index(src: Path) -> dict[int, bytes]:
    """offset -> hash of every non-zero chunk of the RAM that ``src`` composes (version 2)."""
    head = header(src)
    if head.version != 2:
        raise RamFormatError(f"{src.name}: a version 1 image has no index")
    at = _index_at(src)
    total = src.stat().st_size
    with open(src, "rb") as fin:
        fin.seek(at)
        (count,) = SIZE.unpack(fin.read(SIZE.size))
        if at + SIZE.size + count * ENTRY.size + FOOTER.size != total \
                or count > -(-head.size // head.chunk):
            raise RamFormatError(f"{src.name}: corrupt index")
        raw = fin.read(count * ENTRY.size)
    out: dict[int, bytes] = {}
    last = -1
    limit = -(-head.size // head.chunk)
    for no, h in ENTRY.iter_unpack(raw):
        if no <= last or no >= limit:
            raise RamFormatError(f"{src.name}: corrupt index entry {no}")
        out[no * head.chunk] = h
        last = no
    return out


def chunk_hash(data: bytes | memoryview, kind: str = NEW_HASH) -> bytes:
    """The index entry of a chunk: ``kind`` is the image's (``Header.hash``)."""
    if kind == XXH3:
        return xxhash.xxh3_64_digest(data)
    return hashlib.blake2b(data, digest_size=HASH_LEN).digest()


def aligned_chunks(fd: int, size: int, chunk: int) -> Iterator[int]:
    """Offsets of the ``chunk``-aligned chunks that hold any allocated part of a sparse file,
    ascending, each once (two extents may share a chunk)."""
    done = -chunk
    for off, length in data_extents(fd, size):
        pos = max(off - off % chunk, done + chunk)
        while pos < off + length:
            done = pos
            yield pos
            pos += chunk


def file_index(path: Path, chunk: int = DELTA_CHUNK, kind: str = NEW_HASH) -> dict[int, bytes]:
    """The index a sparse RAM file would have: offset -> hash (``kind``) of each non-zero
    chunk."""
    out: dict[int, bytes] = {}
    zero = bytes(chunk)
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start in aligned_chunks(fd, size, CHUNK):  # read a window at a time
            data = os.pread(fd, min(CHUNK, size - start), start)
            for i in range(0, len(data), chunk):
                piece = data[i:i + chunk]
                if piece != zero[:len(piece)]:
                    out[start + i] = chunk_hash(piece, kind)
    return out


@dataclass(frozen=True)
class Packed:
    raw: int  # non-zero bytes of the composed RAM
    stored: int  # bytes of the image file
    digest: str  # its sha256
    changed: int  # raw bytes of the frames it holds (all of ``raw`` for a full image)


_Window = tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes]], int]


def pack_delta(src: Path, dst: Path, parent: Path | None = None, parent_digest: str | None = None,
               *, chunk: int = DELTA_CHUNK, level: int = 1,
               workers: int | None = None, parent_ram: Path | None = None) -> Packed:
    """Compress sparse ``src`` into a version 2 image at ``dst``: with a ``parent`` (a version 2
    image of the same RAM size and chunk, ``parent_digest`` its sha256), only the chunks that
    differ from the parent's composed RAM, and zero frames where the parent had data and
    ``src`` has none; without, every non-zero chunk.

    The RAM is read in 1 MiB windows by ``workers`` threads (hashlib and zstd release the GIL),
    a bounded number ahead of the one thread that writes in offset order. In a window, each
    run of changed chunks with only zero chunks between them is compressed as one frame: a
    delta keeps the compression of large frames however small its chunk (a full image has a
    frame per window, as version 1).

    ``parent_ram``: the parent's RAM composed (a restored VM's RAM cache), if at hand: a chunk
    byte-equal to it there takes the parent's index entry instead of being hashed again (the
    output is the same; a window equal to it as a whole costs one comparison)."""
    if chunk not in _CHUNKS:
        raise ValueError(f"chunk {chunk}: a power of two from 4 KiB to 1 MiB")
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    zero = bytes(chunk)
    base: dict[int, bytes] = {}
    kind = NEW_HASH
    if parent is not None:
        head = header(parent)
        if head.size != os.stat(src).st_size:
            raise RamFormatError(f"{parent.name}: a parent of another RAM size")
        if head.chunk != chunk:
            raise RamFormatError(f"{parent.name}: a parent of another chunk size")
        base = read_index(parent)
        kind = head.hash
    local = threading.local()
    index: dict[int, bytes] = {}
    raw_total = changed = 0

    def window(fd: int, start: int, size: int, pfd: int | None) -> _Window:
        """(index entries, frames (offset, raw length, compressed), raw bytes) of a window."""
        data = os.pread(fd, min(CHUNK, size - start), start)
        old = os.pread(pfd, len(data), start) if pfd is not None else None
        if old == data:  # unchanged since the parent: its entries, nothing stored
            return [(p, base[p]) for p in range(start, start + len(data), chunk)
                    if p in base], [], len(data)
        entries: list[tuple[int, bytes]] = []
        runs: list[tuple[int, int]] = []  # (start, end) within data
        joinable = False  # only zero chunks since the last run ended: it may extend over them
        for i in range(0, len(data), chunk):
            piece = data[i:i + chunk]
            if piece == zero[:len(piece)]:
                continue  # zeros: cheap inside a frame, and correct whatever the parent had
            known = base.get(start + i)
            if known is not None and old is not None and old[i:i + chunk] == piece:
                entries.append((start + i, known))
                joinable = False
                continue
            h = chunk_hash(piece, kind)
            entries.append((start + i, h))
            if known == h:
                joinable = False  # unchanged data is never stored again
                continue
            if runs and joinable:
                runs[-1] = (runs[-1][0], i + len(piece))
            else:
                runs.append((i, i + len(piece)))
            joinable = True
        if not runs:
            return entries, [], len(data)
        comp = getattr(local, "comp", None)
        if comp is None:
            comp = local.comp = zstandard.ZstdCompressor(level=level)
        view = memoryview(data)
        return entries, [(start + a, b - a, compress_frame(comp, view[a:b]))
                         for a, b in runs], len(data)

    with open(src, "rb") as fin, open(dst, "wb") as fout, _Sink(fout) as out, \
            contextlib.ExitStack() as stack, \
            concurrent.futures.ThreadPoolExecutor(workers, "ram-pack") as pool:
        fd = fin.fileno()
        size = os.fstat(fd).st_size
        pfd = None
        if parent_ram is not None and base:
            pram = stack.enter_context(open(parent_ram, "rb"))
            if os.fstat(pram.fileno()).st_size == size:
                pfd = pram.fileno()
        emit = out.write

        emit(_MAGIC_OF[kind] + HEAD2.pack(
            size, chunk, bytes.fromhex(parent_digest) if parent_digest else NO_PARENT))
        ahead: collections.deque[concurrent.futures.Future[_Window]] = collections.deque()
        todo = aligned_chunks(fd, size, CHUNK)
        while True:
            while len(ahead) < 4 * workers:
                pos = next(todo, None)
                if pos is None:
                    break
                ahead.append(pool.submit(window, fd, pos, size, pfd))
            if not ahead:
                break
            entries, frames_, _n = ahead.popleft().result()
            for pos, h in entries:
                index[pos] = h
                raw_total += min(chunk, size - pos)
            for pos, n, packed in frames_:
                emit(FRAME.pack(pos, n, len(packed)), packed)
                changed += n
        stored = _finish_v2(out, base, index, size, chunk)
    return Packed(raw_total, stored, out.hexdigest(), changed)


def _finish_v2(out: _Sink, base: dict[int, bytes], index: dict[int, bytes], size: int,
               chunk: int) -> int:
    """A version 2 image's end, once its data frames are written: zero frames where the parent
    (``base``, its index) had data and the new RAM (``index``) has none, adjacent chunks in one
    frame of at most 1 MiB; the end frame; the index; the footer. Fsyncs; returns the size."""
    emit = out.write
    gone = sorted(base.keys() - index.keys())
    run: list[int] = []
    for pos in [*gone, -1]:
        if run and (pos != run[-1] + chunk or (len(run) + 1) * chunk > CHUNK):
            emit(FRAME.pack(run[0], min(len(run) * chunk, size - run[0]), 0))
            run = []
        if pos >= 0:
            run.append(pos)
    emit(FRAME.pack(END, 0, 0))
    at = out.pos
    emit(SIZE.pack(len(index)) + b"".join(ENTRY.pack(p // chunk, index[p])
                                           for p in sorted(index)))
    emit(FOOTER.pack(at, INDEX_MAGIC))
    return out.sync()


def pack_pages(pages: Path, written: list[tuple[int, int]], base_ram: Path,
               base_index: dict[int, bytes], dst: Path, parent: Path | None = None,
               parent_digest: str | None = None, *, index_hash: str = NEW_HASH,
               level: int = 1, workers: int | None = None, free_pages: bool = False,
               parent_index: dict[int, bytes] | None = None) -> Packed:
    """A version 2 image, as ``pack_delta`` writes it, of the RAM that is ``base_ram`` (a RAM
    composed, e.g. a restored VM's RAM cache; ``base_index`` its index) with the byte ranges
    ``written`` (whole chunks; in any order, overlapping or not) taken from ``pages`` instead
    (a sparse file of the same size): a restored VM's RAM, whose pages it did not write are
    still its cache's.

    A delta over ``parent`` (an image of the same size and chunk; its index says what its
    composed RAM holds), or full without. Only the written chunks are read and hashed, and the
    chunks of ``base_ram`` whose entry differs from the parent's (none when the parent is the
    RAM ``base_ram`` composes); never the rest.

    ``index_hash``: what ``base_index`` is hashed with (its image's ``Header.hash``); the new
    image keeps it, and a parent must have it too.

    ``free_pages``: ``pages`` is a copy made for this (a capture's staging, on tmpfs), each
    window of it punched out once read: its memory goes back as the image is written, by the
    threads that read it, instead of all at once when the file is removed afterwards (~30 ms
    per 256 MiB here, the capture's last step).

    ``parent_index``: ``parent``'s index, when the caller read it already (the first capture
    after a restore is a delta over the image its cache composes, ``base_index``): not read
    again (~80k entries for 320 MiB of RAM, ~10 ms of the packer's one thread)."""
    chunk = DELTA_CHUNK
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    size = os.stat(base_ram).st_size
    if os.stat(pages).st_size != size:
        raise RamFormatError(f"{pages.name}: not of the RAM's size")
    base: dict[int, bytes] = {}
    if parent is not None:
        head = header(parent)
        if head.size != size:
            raise RamFormatError(f"{parent.name}: a parent of another RAM size")
        if head.chunk != chunk:
            raise RamFormatError(f"{parent.name}: a parent of another chunk size")
        if head.hash != index_hash:
            raise RamFormatError(f"{parent.name}: a parent hashed with {head.hash}, the RAM's "
                                 f"index with {index_hash}")
        base = read_index(parent) if parent_index is None else parent_index
    spans = _window_spans(written, chunk, size)  # window -> its written runs, within it
    mine: set[int] = set()
    for w, runs_in in spans.items():
        for a, b in runs_in:
            mine.update(range(w + a, w + b, chunk))
    index = dict(base_index)
    for p in mine & base_index.keys():
        del index[p]  # set again below if the page holds data
    # the cache's chunks whose entry the parent does not have (none for the first capture
    # after a restore: the parent is the RAM the cache composes), by window
    theirs: dict[int, set[int]] = {}
    if base is not base_index and base != base_index:
        for p in base_index.keys() - mine:
            if base_index[p] != base.get(p):
                theirs.setdefault(p - p % CHUNK, set()).add(p)
    windows = sorted(spans.keys() | theirs.keys())
    local = threading.local()
    zero = bytes(chunk)
    hash_of: Callable[[memoryview], bytes] = (
        xxhash.xxh3_64_digest if index_hash == XXH3
        else functools.partial(chunk_hash, kind=index_hash))

    def window(start: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes]]]:
        """(index entries of written chunks, data frames) of one 1 MiB window."""
        n = min(CHUNK, size - start)
        written_here = spans.get(start, [])
        cached = theirs.get(start)
        new = memoryview(os.pread(pfd, n, start) if written_here else b"")
        if written_here and free_pages:
            _punch(pfd, start, n)
        entries: list[tuple[int, bytes]] = []
        runs: list[tuple[int, int]] = []
        base_get = base.get
        # the written chunks: hashed, and stored where the parent does not have them
        for a, b in written_here:
            for i in range(a, b, chunk):
                piece = new[i:i + chunk]
                if piece == zero:
                    continue  # a zero frame, if the parent had data: after the frames
                h = hash_of(piece)
                entries.append((start + i, h))
                if base_get(start + i) == h:
                    continue
                if runs and runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], i + chunk)
                else:
                    runs.append((i, i + chunk))
        comp = getattr(local, "comp", None)
        if comp is None:
            comp = local.comp = zstandard.ZstdCompressor(level=level)
        if not cached:  # the usual case: every chunk stored is a written one
            return entries, [(start + a, b - a, compress_frame(comp, new[a:b]))
                             for a, b in runs]
        # and the cache's data that the parent does not have, in offset order
        old = memoryview(os.pread(bfd, n, start))
        chunks = sorted([(start + i, new) for a, b in runs for i in range(a, b, chunk)]
                        + [(p, old) for p in cached])
        groups: list[tuple[int, list[memoryview]]] = []  # (offset, its adjacent chunks)
        for p, src in chunks:
            i = p - start
            if groups and groups[-1][0] + len(groups[-1][1]) * chunk == p:
                groups[-1][1].append(src[i:i + chunk])
            else:
                groups.append((p, [src[i:i + chunk]]))
        return entries, [(p, len(parts) * chunk, compress_frame(comp, b"".join(parts)))
                         for p, parts in groups]

    changed = 0
    with open(pages, "r+b" if free_pages else "rb") as fpages, open(base_ram, "rb") as fbase, \
            open(dst, "wb") as fout, _Sink(fout) as out, \
            concurrent.futures.ThreadPoolExecutor(workers, "ram-pack") as pool:
        pfd, bfd = fpages.fileno(), fbase.fileno()
        emit = out.write

        emit(_MAGIC_OF[index_hash] + HEAD2.pack(
            size, chunk, bytes.fromhex(parent_digest) if parent_digest else NO_PARENT))
        ahead: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        queue = iter(windows)
        while True:
            while len(ahead) < 4 * workers:
                start = next(queue, None)
                if start is None:
                    break
                ahead.append(pool.submit(window, start))
            if not ahead:
                break
            entries, frames_ = ahead.popleft().result()
            index.update(entries)
            for pos, n, packed in frames_:
                emit(FRAME.pack(pos, n, len(packed)), packed)
                changed += n
        stored = _finish_v2(out, base, index, size, chunk)
    # every chunk is whole but maybe the last (a RAM size not a multiple of the chunk)
    last = size - size % chunk if size % chunk else -1
    raw = len(index) * chunk - (chunk - size % chunk if last in index else 0)
    return Packed(raw, stored, out.hexdigest(), changed)


def _window_spans(written: list[tuple[int, int]], chunk: int,
                  size: int) -> dict[int, list[tuple[int, int]]]:
    """``written`` (byte ranges of whole chunks) as runs within each 1 MiB window, by the
    window's offset; ranges that overlap or touch are merged."""
    merged: list[list[int]] = []
    for a, b in sorted(written):
        if a % chunk or b % chunk or b > size or a > b:
            raise ValueError(f"written range {a}-{b}: not whole chunks of the RAM")
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif a < b:
            merged.append([a, b])
    spans: dict[int, list[tuple[int, int]]] = {}
    for a, b in merged:
        pos = a
        while pos < b:
            w = pos - pos % CHUNK
            end = min(b, w + CHUNK)
            spans.setdefault(w, []).append((pos - w, end - w))
            pos = end
    return spans


_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch(fd: int, off: int, n: int) -> bool:
    """Make a range of a file a hole, where the file system can; whether it did."""
    try:
        return int(_libc().fallocate(fd, _PUNCH, ctypes.c_long(off), ctypes.c_long(n))) == 0
    except (OSError, AttributeError):
        return False


def _zero_range(fd: int, off: int, n: int) -> None:
    """Make a range zero again: a hole when the file system can punch one, else zeros."""
    if not _punch(fd, off, n):
        os.pwrite(fd, bytes(n), off)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


#: an image's bytes written between two starts of their write-back (``_Sink``, through the
#: page cache)
WRITEBACK = 8 << 20
#: buffers written but not hashed yet, at most (``_Sink``): a few MiB of frames
HASH_AHEAD = 8
#: the largest write to an image through the page cache. The page cache keeps what one write
#: put there as one folio of up to that size (``UNPACK_WRITE``)
SINK_WRITE = 64 << 10
#: an image written past the page cache goes out in blocks of this size, from one buffer
DIRECT_BLOCK = 4 << 20
#: what a write past the page cache must be aligned to (offset, length and memory)
DIRECT_ALIGN = 4096
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writing the range out, wait for nothing


class _Sink:
    """Where a packer writes its image: in order, hashing what it writes (the image's sha256).

    The image goes to the disk past the page cache (``O_DIRECT``, ``_DirectFile``) where the
    file system takes that. Through the page cache, each write took memory the page cache did
    not have, and that memory cost more CPU, the later in a run the more (this machine is a
    VM whose host takes free memory back and faults it in again): in the snapshot bench's
    later rows 256 MiB of written pages took 0.35-0.68 s of the packer's CPU to write, in 1 MiB
    or in 64 KiB writes alike, against ~0.07 s in its first rows, and the capture to READY
    reached 1.0x ``virsh save``. Past the page cache the bytes go from one reused buffer
    straight to the disk, and the fsync at the end waits for no write-back. Nothing reads an
    image right after it is packed: a restore reads it once, to build its RAM cache.

    Elsewhere, through the page cache, in writes of at most ``SINK_WRITE``, starting the
    disk's write-back of every ``WRITEBACK`` bytes as they pass, so that the disk writes while
    the threads still compress and the fsync waits for the tail only.

    The sha256 runs in a thread of its own, fed what is written in order (at most
    ``HASH_AHEAD`` buffers behind), and the direct writes in another, fed by it: the writer is
    a packer's one serial thread, and hashing (~1.15 GB/s here, SHA-NI) is the longest part of
    a pack of incompressible pages. A context manager: the threads end, and the file it opened
    is closed, on the way out, whatever happened."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self._digest = hashlib.sha256()
        self.pos = self.started = f.tell()
        self._direct = _DirectFile.open(f) if self.pos == 0 else None
        self._error: OSError | None = None
        self._todo: queue.Queue[bytes | memoryview | None] = queue.Queue(HASH_AHEAD)
        self._hasher = threading.Thread(target=self._hash, name="ram-pack-sha256", daemon=True)
        self._writer: threading.Thread | None = None
        if self._direct is not None:
            self._writes: queue.Queue[bytes | memoryview | None] = queue.Queue(HASH_AHEAD)
            self._writer = threading.Thread(target=self._write_direct, args=(self._direct,),
                                            name="ram-pack-write", daemon=True)
            self._writer.start()
        self._hasher.start()

    @property
    def direct(self) -> bool:
        """Whether the image goes past the page cache."""
        return self._direct is not None

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self._direct is not None:
            self._direct.close()

    def _hash(self) -> None:
        while (buf := self._todo.get()) is not None:
            self._digest.update(buf)
            if self._direct is not None:
                self._writes.put(buf)
        if self._direct is not None:
            self._writes.put(None)

    def _write_direct(self, direct: _DirectFile) -> None:
        while (buf := self._writes.get()) is not None:
            if self._error is None:
                try:
                    direct.add(buf)
                except OSError as exc:  # raised to the packer at its next write or sync
                    self._error = exc

    def _stop(self) -> None:
        if self._hasher.is_alive():
            self._todo.put(None)
            self._hasher.join()
        if self._writer is not None:
            self._writer.join()  # the hasher's last put ends it

    def write(self, *bufs: bytes | memoryview) -> None:
        """Append ``bufs`` (never changed afterwards: the thread reads them later)."""
        if self._error is not None:
            raise self._error
        for buf in bufs:
            if self._direct is None:
                view = memoryview(buf)
                for at in range(0, len(view), SINK_WRITE):
                    self.f.write(view[at:at + SINK_WRITE])
            self._todo.put(buf)
            self.pos += len(buf)
        if self._direct is None and self.pos - self.started >= WRITEBACK:
            self.f.flush()
            _start_writeback(self.f.fileno(), self.started, self.pos - self.started)
            self.started = self.pos

    def sync(self) -> int:
        """Everything written and fsynced, the hash complete; the image's size."""
        self._stop()
        if self._error is not None:
            raise self._error
        if self._direct is not None:
            self._direct.finish(self.pos)
        else:
            self.f.flush()
            os.fsync(self.f.fileno())
        return self.pos

    def hexdigest(self) -> str:
        """The sha256 of what was written (after ``sync``)."""
        if self._hasher.is_alive():
            raise RuntimeError("the image's hash is not complete before sync()")
        return self._digest.hexdigest()


class _DirectFile:
    """A new file written past the page cache: whole ``DIRECT_BLOCK`` blocks from one buffer
    (page-aligned, touched once), the tail padded to ``DIRECT_ALIGN`` and cut back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = mmap.mmap(-1, DIRECT_BLOCK)
        self._view = memoryview(self._buf)
        self._n = 0  # bytes in the buffer
        self._at = 0  # where the buffer goes in the file

    @classmethod
    def open(cls, f: BinaryIO) -> _DirectFile | None:
        """The file ``f`` writes, opened again for direct writes; None where the file system
        takes none (or ``f`` is no file)."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_WRONLY | os.O_CLOEXEC | flag)
        except (OSError, ValueError):
            return None
        try:
            d = cls(fd)
        except OSError:  # no memory for the buffer
            os.close(fd)
            return None
        try:
            d._out(DIRECT_ALIGN)  # zeros where the image begins: refused where unsupported
        except OSError:
            d.close()
            return None
        d._at = 0
        return d

    def add(self, data: bytes | memoryview) -> None:
        src = memoryview(data).cast("B")
        i = 0
        while i < len(src):
            k = min(DIRECT_BLOCK - self._n, len(src) - i)
            self._view[self._n:self._n + k] = src[i:i + k]
            self._n += k
            i += k
            if self._n == DIRECT_BLOCK:
                self._out(DIRECT_BLOCK)

    def _out(self, n: int) -> None:
        done = 0
        while done < n:
            # released at once, even when the write fails: the buffer closes only unexported
            with self._view[done:n] as part:
                wrote = os.pwrite(self.fd, part, self._at + done)
            if wrote <= 0:
                raise OSError(errno.EIO, "a direct write wrote nothing")
            done += wrote
        self._at += n
        self._n = 0

    def finish(self, size: int) -> None:
        """The tail written, the file cut to ``size`` and fsynced."""
        if self._n:
            pad = -self._n % DIRECT_ALIGN
            self._view[self._n:self._n + pad] = bytes(pad)
            self._out(self._n + pad)
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def close(self) -> None:
        self._view.release()
        self._buf.close()
        os.close(self.fd)


def _start_writeback(fd: int, off: int, n: int) -> None:
    """Where the kernel cannot (another OS, a file system without it), the fsync at the end
    writes everything, as it always does: this only starts it earlier."""
    try:
        _libc().sync_file_range(fd, ctypes.c_longlong(off), ctypes.c_longlong(n),
                                ctypes.c_uint(_SFR_WRITE))
    except (OSError, AttributeError):
        pass


#: the size of each write of an unpack. The page cache keeps what one write put there as one
#: folio of up to that size, and lets go of a folio only whole (``host/residency.py``): a cache
#: written 1 MiB at a time kept 69-77 MiB for ten clones, 64 KiB at a time 45 MiB
UNPACK_WRITE = 64 << 10


def unpack_chain(chain: list[Path], dst: Path, digests: list[str] | None = None) -> int:
    """Rebuild the sparse RAM file that a chain of images composes, base (a full image) first,
    each image a delta over the one before it. With ``digests`` (the chain's sha256s), each
    delta's header must name the image before it: a chain out of order or with a gap is
    refused, never composed into a wrong RAM. Returns the bytes written."""
    if not chain:
        raise RamFormatError("an empty RAM chain")
    heads = [header(p) for p in chain]
    if heads[0].parent is not None:
        raise RamFormatError(f"{chain[0].name}: a delta without its parent")
    for i in range(1, len(chain)):
        if heads[i].parent is None:
            raise RamFormatError(f"{chain[i].name}: a full image inside a chain")
        if digests is not None and heads[i].parent != digests[i - 1]:
            raise RamFormatError(f"{chain[i].name}: not a delta over {digests[i - 1][:12]}")
        if heads[i].size != heads[0].size:
            raise RamFormatError(f"{chain[i].name}: another RAM size than its parent")
    written = 0
    with open(dst, "wb") as fout:
        fout.truncate(heads[-1].size)
        fd = fout.fileno()
        for src in chain:
            for off, n, data in records(src):
                if data is None:
                    _zero_range(fd, off, n)
                else:
                    view = memoryview(data)
                    for i in range(0, n, UNPACK_WRITE):
                        os.pwrite(fd, view[i:i + UNPACK_WRITE], off + i)
                    written += n
    return written
