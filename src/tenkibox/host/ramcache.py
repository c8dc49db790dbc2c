"""The unpacked RAM of a snapshot, mapped copy-on-write by every VM restored from it.

A derived cache, so never trusted blindly: each cache file has a content digest (sha256 over its
non-zero 1 MiB chunks and their offsets, computed from what was written) and the stat key it had
then. Before a restore maps it, the stat key is compared (any change made through the kernel
moves it, see ``artifacts.digests``); if it moved, the content is hashed again, and a cache that
no longer matches is rebuilt from the stored, verified RAM image. ``scrub`` re-hashes regardless
(and rebuilds what is damaged only when asked to repair; until then no restore maps it).

On the data disk, not tmpfs: its pages are page cache, shared by the clones and evictable
under memory pressure (a private mapping never writes back). Of them only the pages its clones
use stay in memory: the host tells the cache which pages those are (``note_used``) and the cache
drops the others (``trim``, see ``residency``).

A snapshot of a lineage has a delta RAM image (``ramfile`` version 2): its cache, keyed by the
top image's digest, is the whole chain applied base first into one file (each image's header
names its parent, so the chain is found from the top alone and a scrub can rebuild it). Such a
cache is checked against the top image's index (a hash per chunk) instead of a content digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from ..artifacts import ramfile
from ..artifacts.digests import stat_key
from ..artifacts.store import ArtifactError, ArtifactStore
from ..engine.pagemap import PagemapError
from ..errors import TenkiError
from ..fsync import fsync_path
from . import residency
from .api import CacheScrub

log = logging.getLogger(__name__)

CHUNK = ramfile.CHUNK
#: the longest chain of delta RAM images followed (a capture starts a full image sooner)
MAX_CHAIN = 64
_ZERO = bytes(CHUNK)


def content_digest(path: Path) -> str:
    """sha256 over (offset, bytes) of every non-zero chunk: holes and zero pages count alike."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        done = -CHUNK  # the last chunk hashed: two extents can share one chunk
        for off, length in ramfile.data_extents(fd, size):
            pos = max(off - off % CHUNK, done + CHUNK)
            while pos < off + length:
                done = pos
                data = os.pread(fd, CHUNK, pos)
                if data and data != _ZERO[:len(data)]:
                    digest.update(pos.to_bytes(8, "little"))
                    digest.update(data)
                pos += CHUNK
    return digest.hexdigest()


class _ChunkHasher:
    """``content_digest`` computed while the chunks are written, in one pass."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.digest = hashlib.sha256()
        self.pos = -1  # the aligned chunk being assembled
        self.buf = bytearray(CHUNK)

    def _flush(self) -> None:
        if self.pos < 0:
            return
        n = min(CHUNK, self.size - self.pos)
        if self.buf[:n] != _ZERO[:n]:
            self.digest.update(self.pos.to_bytes(8, "little"))
            self.digest.update(self.buf[:n])

    def add(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            pos = off - off % CHUNK
            if pos != self.pos:
                self._flush()
                self.pos = pos
                self.buf[:] = _ZERO
            take = min(len(view), pos + CHUNK - off)
            self.buf[off - pos:off - pos + take] = view[:take]
            view, off = view[take:], off + take

    def hexdigest(self) -> str:
        self._flush()
        self.pos = -1
        return self.digest.hexdigest()


def image_content_digest(src: Path) -> str:
    """The ``content_digest`` that unpacking the RAM image ``src`` yields, without writing."""
    hasher = _ChunkHasher(ramfile.image_size(src))
    for _size, off, data in ramfile.frames(src):
        hasher.add(off, data)
    return hasher.hexdigest()


class RamCache:
    def __init__(self, root: Path, store: ArtifactStore) -> None:
        self.root = root
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}
        #: per cache, the pages its clones were seen to use since its last trim
        #: (``residency`` page maps), which the next ``trim`` keeps in memory
        self._used: dict[str, bytes] = {}
        self._used_lock = threading.Lock()  # note_used and trim run in worker threads

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.ram"

    def _meta(self, digest: str) -> Path:
        return self.root / f"{digest}.meta"

    def _check(self, digest: str) -> bool:
        """True when the cache of ``digest`` can be mapped as it is (every restore): only if its
        stat key is the one it had when it was unpacked or last verified; any change moves it,
        and a changed cache is simply rebuilt (as cheap as re-hashing it, and never wrong)."""
        try:
            info = json.loads(self._meta(digest).read_text())
            key = stat_key(self.path(digest))
        except (OSError, ValueError):
            return False
        return bool(key == info.get("key"))

    def intact(self, digest: str) -> bool:
        """Whether the cache of ``digest``, built and checked before, is still as it was (its
        stat key): a spare maps it long before its guest runs (``restore.still_intact``)."""
        return self._check(digest)

    def chain(self, digest: str) -> list[str]:
        """The RAM images that compose ``digest``, base first, each verified before its header
        is read (a damaged image is never parsed)."""
        chain = [digest]
        while True:
            self.store.verify(chain[-1], "RAM image")
            parent = ramfile.header(self.store.local_path(chain[-1])).parent
            if parent is None:
                return chain[::-1]
            if parent in chain or len(chain) > MAX_CHAIN:
                raise ramfile.RamFormatError(f"RAM image {digest[:12]}: a chain that loops "
                                             "or is too long")
            chain.append(parent)

    def _problem(self, digest: str) -> str | None:
        """Compare the cache's content with what the stored RAM image says it must be, whatever
        its stat says (scrub). None when it matches (its key is then remembered); else what is
        wrong, and the cache is no longer vouched for (the next restore rebuilds it)."""
        cache = self.path(digest)
        try:
            self.store.verify(digest, "RAM image", deep=True)  # never parse a damaged image
            image = self.store.local_path(digest)
            head = ramfile.header(image)
            v2 = head.version == 2
            expected: object = (ramfile.read_index(image) if v2
                                else image_content_digest(image))
        except (OSError, ValueError, ArtifactError) as exc:
            # the image itself is gone or unreadable: nothing vouches for the cache
            why = _why(exc)
            problem = f"cannot be checked: its RAM image is unreadable ({why})"
        else:
            try:
                key = stat_key(cache)  # before the read: a change during it moves the key
                found: object = (ramfile.file_index(cache, head.chunk, head.hash) if v2
                                 else content_digest(cache))
                matches = found == expected
            except OSError as exc:
                problem = f"is unreadable ({exc.strerror})"
            else:
                if matches:
                    self._write_meta(digest, key)
                    return None
                problem = "does not match its RAM image"
        self._meta(digest).unlink(missing_ok=True)
        return f"RAM cache {digest[:12]} {problem}"

    def _write_meta(self, digest: str, key: str | None = None) -> None:
        meta = self._meta(digest)
        tmp = meta.with_name(f".{meta.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps({"key": key or stat_key(self.path(digest))}))
        fsync_path(tmp)
        os.replace(tmp, meta)
        fsync_path(meta.parent)

    def _build(self, digest: str) -> None:
        chain = self.chain(digest)  # every image verified
        cache = self.path(digest)
        tmp = cache.with_name(f".{cache.name}.{secrets.token_hex(4)}.tmp")
        try:
            ramfile.unpack_chain([self.store.local_path(d) for d in chain], tmp, chain)
            # on disk before anything vouches for it; and written back now, while the restore
            # that needs it waits for the unpack anyway, not by a trim (``residency``) beside
            # the restores that come next (~0.14 s of writing for 300 MiB here)
            fsync_path(tmp)
            os.replace(tmp, cache)
        finally:
            tmp.unlink(missing_ok=True)
        self._write_meta(digest)

    async def ensure(self, digest: str) -> Path:
        """The verified cache of RAM image ``digest``, built or rebuilt if needed."""
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            self.root.mkdir(parents=True, exist_ok=True)
            if not await asyncio.to_thread(self._check, digest):
                await asyncio.to_thread(self._build, digest)
        return self.path(digest)

    def note_used(self, digest: str, pids: list[int]) -> None:
        """Add the pages of ``digest``'s cache that processes ``pids`` map (its clones' QEMUs)
        to those the next ``trim`` keeps. A process that is gone or unreadable adds nothing."""
        path = self.path(digest)
        for pid in pids:
            try:
                seen = residency.touched(pid, path)
            except PagemapError as exc:
                log.debug("RAM cache %s: %s", digest[:12], exc)
                continue
            with self._used_lock:
                used = self._used.get(digest)
                self._used[digest] = seen if used is None or len(used) != len(seen) else \
                    residency.union(used, seen)

    def trim(self, digest: str) -> int:
        """Keep in memory only the pages of ``digest``'s cache noted since the last trim (the
        clones running at a trim and those that stopped since: a page only a clone long gone
        read is let go of); nothing is dropped while none were noted, so a cache no clone has
        run from keeps all of it. Returns the bytes advised."""
        with self._used_lock:
            used = self._used.pop(digest, None)
        if not used or used.find(1) < 0:
            return 0
        try:
            return residency.drop_unused(self.path(digest), used)
        except OSError as exc:
            log.debug("RAM cache %s: not trimmed: %s", digest[:12], exc.strerror)
            return 0

    def scrub(self, *, repair: bool) -> CacheScrub:
        """Re-hash every cache against its RAM image. A damaged one is no longer trusted (a
        restore rebuilds it before mapping it); with ``repair`` it is rebuilt now, or removed
        when it cannot be (the next restore tries again)."""
        out = CacheScrub()
        for cache in sorted(self.root.glob("*.ram")):
            digest = cache.stem
            if not self.store.has(digest):
                # its snapshot is deleted: no restore can name it again, so it is not damaged,
                # only waiting for the collector's grace; nothing vouches for it any more
                self._meta(digest).unlink(missing_ok=True)
                continue
            problem = self._problem(digest)
            if problem is None:
                continue
            log.warning("%s", problem)
            if not repair:
                out.damaged[digest] = f"{problem}; not rebuilt (the next restore rebuilds it)"
                continue
            try:
                self._build(digest)
            except Exception as exc:
                why = _why(exc)
                log.warning("RAM cache %s could not be rebuilt: %s", digest[:12], why)
                with contextlib.suppress(OSError):
                    cache.unlink()
                out.damaged[digest] = f"{problem}; could not be rebuilt ({why}): removed"
                continue
            out.rebuilt.append(digest)
        return out

    def clear_temporaries(self) -> None:
        """At start-up no unpack runs: every temporary is a crashed one's."""
        for tmp in self.root.glob(".*.tmp") if self.root.exists() else []:
            tmp.unlink(missing_ok=True)

    def collect(self, keep: set[str], grace_s: float = 300.0) -> int:
        """Remove caches of RAM images nothing uses any more, and temporaries."""
        freed = 0
        now = time.time()
        for entry in list(self.root.iterdir()) if self.root.exists() else []:
            name = entry.name
            if name.startswith("."):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > 60:
                        entry.unlink()
                continue
            digest = name.split(".", 1)[0]
            if digest in keep:
                continue
            with contextlib.suppress(OSError):
                st = entry.stat()
                if now - st.st_ctime < grace_s:
                    continue
                freed += st.st_blocks * 512
                entry.unlink()
                with self._used_lock:
                    self._used.pop(digest, None)
        return freed


def _why(exc: BaseException) -> str:
    """What went wrong, without the file's host path (an OSError's str names it)."""
    if isinstance(exc, TenkiError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
