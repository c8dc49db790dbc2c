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
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import zstandard

MAGIC = b"TENKIRAM1\n"
END = (1 << 64) - 1
CHUNK = 1 << 20
FRAME = struct.Struct("<QQQ")
SIZE = struct.Struct("<Q")
_ZERO = bytes(CHUNK)


class RamFormatError(ValueError):
    pass


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
    digest = hashlib.sha256()
    raw_total = 0

    def compress(fd: int, pos: int, n: int) -> tuple[int, int, bytes | None]:
        chunk = os.pread(fd, n, pos)
        if chunk == _ZERO[:n]:
            return pos, n, None
        comp = getattr(local, "comp", None)
        if comp is None:
            comp = local.comp = zstandard.ZstdCompressor(level=level)
        return pos, n, comp.compress(chunk)

    with open(src, "rb") as fin, open(dst, "wb") as fout, \
            concurrent.futures.ThreadPoolExecutor(workers, "ram-pack") as pool:
        fd = fin.fileno()
        size = os.fstat(fd).st_size

        def emit(buf: bytes) -> None:
            fout.write(buf)
            digest.update(buf)

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
                emit(FRAME.pack(pos, n, len(packed)) + packed)
                raw_total += n
        emit(FRAME.pack(END, 0, 0))
        fout.flush()
        os.fsync(fout.fileno())
        stored = fout.tell()
    return raw_total, stored, digest.hexdigest()


def frames(src: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(total size, offset, data)`` of every stored chunk of a RAM image, in offset order."""
    dec = zstandard.ZstdDecompressor()
    with open(src, "rb") as fin:
        if fin.read(len(MAGIC)) != MAGIC:
            raise RamFormatError(f"{src.name}: not a tenki RAM image")
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
    with open(src, "rb") as fin:
        if fin.read(len(MAGIC)) != MAGIC:
            raise RamFormatError(f"{src.name}: not a tenki RAM image")
        (size,) = SIZE.unpack(fin.read(SIZE.size))
    return int(size)


def unpack(src: Path, dst: Path) -> int:
    """Rebuild a sparse RAM file from a RAM image; returns the bytes written."""
    written = 0
    with open(dst, "wb") as fout:
        fout.truncate(image_size(src))
        fd = fout.fileno()
        for _size, off, data in frames(src):
            os.pwrite(fd, data, off)
            written += len(data)
    return written
