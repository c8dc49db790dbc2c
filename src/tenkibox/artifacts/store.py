"""The artifact store: immutable files named by the sha256 of their content.

RAM images, device states, disk layers, base images, kernels and initrds all live here, and
records (snapshot manifests, session rows) name them by digest only: nothing outside the host
knows a path, so another implementation (an S3 bucket, with a local cache on each host) can stand
behind the same interface.

``LocalArtifactStore`` keeps ``<root>/sha256/<digest>`` (mode 0444, never written in place).
Putting a file hard-links it when it is on the same file system (a frozen qcow2 layer stays open in
its VM under its old name), else copies it; either way the content is hashed (or the given digest
checked), fsynced and renamed into place atomically, so a crash leaves either nothing or a whole,
correct file. ``verify`` re-hashes a file whenever it may have changed (see ``digests``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import InternalError
from ..fsync import fsync_path
from .digests import VerifiedKeys, sha256_file

log = logging.getLogger(__name__)

#: Unreferenced artifacts stored less than this long ago are kept: a collection computes what is
#: referenced, then lists the store, and a capture may store a file in between (the host also
#: counts what its captures in flight have stored as referenced).
GC_GRACE_S = 5.0

#: A temporary file of the store older than this is a crashed writer's (a put, or a verified-key
#: record, is written and renamed within it); younger ones may still be renamed into place.
TEMP_MAX_AGE_S = 60.0


class ArtifactError(InternalError):
    """An artifact is missing or does not match its digest."""

    def __init__(self, message: str, *, digest: str, kind: str = "artifact") -> None:
        super().__init__(message)
        self.digest = digest
        self.kind = kind


class ArtifactMissing(ArtifactError):
    pass


class ArtifactCorrupt(ArtifactError):
    pass


@dataclass(frozen=True)
class ArtifactInfo:
    digest: str
    size_bytes: int
    allocated_bytes: int
    #: when it entered the store (ctime: a hard link keeps the source's old mtime)
    stored_at: float


class ArtifactStore(Protocol):
    """What the host needs from wherever artifacts are kept: the host (``host/``) is typed
    against this, never against ``LocalArtifactStore``.

    Paths in it are local to the host: a remote store (S3) would keep a local cache directory
    of the artifacts this host uses, fill it on ``local_path``/``verify`` (download, then hash),
    upload on ``put`` and list the bucket in ``entries``.
    """

    #: its questions (``has``, ``put``, ``verify``) may be requests over the network: not to be
    #: asked on an event loop
    remote: bool

    def temp_path(self) -> Path: ...
    def put(self, src: Path, *, digest: str | None = None, move: bool = False) -> str:
        """Store ``src`` and return its digest; a given ``digest`` is trusted (the caller
        hashed the same bytes: a boot, an image's file against its build's record). S3: an
        upload only when the bucket lacks the object."""
        ...

    def has(self, digest: str) -> bool: ...
    def local_path(self, digest: str) -> Path: ...

    def verify(self, digest: str, kind: str = "artifact", *, deep: bool = False) -> None:
        """Raise ``ArtifactMissing``/``ArtifactCorrupt`` unless the stored copy matches its
        digest: re-read only when it may have changed since it was last hashed (every restore
        and boot), or always with ``deep`` (the scrub, ``tenki admin verify``)."""
        ...

    def damaged(self, digests: dict[str, str], *, deep: bool = False) -> dict[str, str]: ...
    def size(self, digest: str) -> int: ...

    def cached_size(self, digest: str) -> int:
        """Bytes of ``digest`` readable on this machine without a download (0: none)."""
        ...

    def allocated(self, digest: str) -> int:
        """Bytes the artifact takes in storage (0 if absent): its disk blocks here, what a
        snapshot's ``stored_bytes`` counts. S3: the object's size (what the bucket bills)."""
        ...

    def delete(self, digest: str) -> int: ...
    def entries(self) -> list[ArtifactInfo]: ...
    def collect(self, referenced: Iterable[str], grace_s: float = GC_GRACE_S) -> int: ...

    def strays(self) -> list[Path]:
        """Local files of the store that are no artifact: temporaries of puts, and of records
        of verified keys, that a crash cut short (nothing of the store is in flight when the
        host starts, so it removes them then; ``collect`` removes those older than
        ``TEMP_MAX_AGE_S`` later). S3: the temporaries of its local cache and
        staging directory (an interrupted multipart upload is the bucket's lifecycle rule's
        to abort)."""
        ...


def damaged_among(store: ArtifactStore, digests: dict[str, str], *,
                  deep: bool = False) -> dict[str, str]:
    """``ArtifactStore.damaged`` in terms of its ``verify``: digest -> what is wrong, for each
    of ``digests`` (digest -> kind) that is missing or corrupt, in the order given."""
    bad: dict[str, str] = {}
    for digest, kind in digests.items():
        try:
            store.verify(digest, kind, deep=deep)
        except ArtifactError as exc:
            bad[digest] = exc.message
    return bad


def _valid_digest(digest: str) -> bool:
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


class LocalArtifactStore:
    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "sha256"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.keys = VerifiedKeys(root / ".verified")

    def local_path(self, digest: str) -> Path:
        if not _valid_digest(digest):
            raise ArtifactMissing(f"not an artifact digest: {digest[:80]!r}", digest=digest)
        return self.objects / digest

    def has(self, digest: str) -> bool:
        return self.local_path(digest).exists()

    def size(self, digest: str) -> int:
        try:
            return self.local_path(digest).stat().st_size
        except OSError:
            return 0

    def allocated(self, digest: str) -> int:
        try:
            return self.local_path(digest).stat().st_blocks * 512
        except OSError:
            return 0

    def cached_size(self, digest: str) -> int:
        """Everything this store holds is on this machine."""
        return self.size(digest) if _valid_digest(digest) else 0

    def temp_path(self) -> Path:
        """A fresh temporary name on the store's file system: write a file there and ``put``
        it with ``move=True`` to store it without a copy (a crashed writer's leftover is
        removed by ``collect``)."""
        return self.objects / f".new-{secrets.token_hex(8)}.tmp"

    def put(self, src: Path, *, digest: str | None = None, move: bool = False) -> str:
        """Store ``src`` (hashed here unless ``digest`` is given, which is then trusted only
        after it was computed by the caller from the same bytes) and return its digest."""
        if digest is None:
            digest = sha256_file(src)
        dest = self.local_path(digest)
        if dest.exists():
            # stored again: its time moves, so a collection already under way spares it
            with contextlib.suppress(OSError):
                os.utime(dest)
            if move:
                src.unlink(missing_ok=True)
            return digest
        tmp = self.objects / f".{digest}.{secrets.token_hex(4)}.tmp"
        try:
            if move:
                try:
                    os.replace(src, tmp)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    shutil.copyfile(src, tmp)  # another file system (tmpfs staging)
                    src.unlink()
            else:
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
            # read-only: a hard link shares the source's mode, which may be 0444 already
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
            fsync_path(self.objects)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.keys.remember(dest, digest)
        return digest

    def verify(self, digest: str, kind: str = "artifact", *, deep: bool = False) -> None:
        """Raise ``ArtifactMissing``/``ArtifactCorrupt`` unless the file matches its name.
        ``deep`` re-reads the content even when the file looks unchanged (scrub, admin verify)."""
        path = self.local_path(digest)
        if not path.exists():
            raise ArtifactMissing(f"{kind} {digest[:12]} is missing", digest=digest, kind=kind)
        got = None if deep else self.keys.known(path)
        if got is None:
            got = sha256_file(path)
            if got == digest:
                self.keys.remember(path, got)
        if got != digest:
            self.keys.forget(path)
            raise ArtifactCorrupt(
                f"{kind} {digest[:12]} is corrupt (its content hashes to {got[:12]})",
                digest=digest, kind=kind)

    def damaged(self, digests: dict[str, str], *, deep: bool = False) -> dict[str, str]:
        """digest -> what is wrong, for each of ``digests`` (digest -> kind) that is missing or
        corrupt, in the order given."""
        return damaged_among(self, digests, deep=deep)

    def delete(self, digest: str) -> int:
        path = self.local_path(digest)
        freed = self.allocated(digest)
        self.keys.forget(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return freed
        return 0

    def entries(self) -> list[ArtifactInfo]:
        out = []
        for entry in self.objects.iterdir():
            if not _valid_digest(entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat()
                out.append(ArtifactInfo(entry.name, st.st_size, st.st_blocks * 512,
                                        st.st_ctime))
        return out

    def collect(self, referenced: Iterable[str], grace_s: float = GC_GRACE_S) -> int:
        """Delete artifacts nothing references (and temporaries of crashed puts)."""
        keep = set(referenced)
        now = time.time()
        freed = 0
        for info in self.entries():
            if info.digest in keep or now - info.stored_at < grace_s:
                continue
            log.info("artifact %s: unreferenced, removed", info.digest[:12])
            freed += self.delete(info.digest)
        for tmp in self.strays():
            # a put or a verified-key record written right now is younger than a minute
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > TEMP_MAX_AGE_S:
                    tmp.unlink()
        return freed

    def strays(self) -> list[Path]:
        # a crashed put's temporary, and a verified-key record's (``.verified/.*.tmp``)
        out = [p for p in self.objects.iterdir() if not _valid_digest(p.name)]
        if self.keys.directory.is_dir():
            out += self.keys.directory.glob(".*.tmp")
        return out
