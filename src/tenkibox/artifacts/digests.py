"""Content digests, and when a file's digest may be trusted without reading it again.

A file is re-hashed whenever its ``(device, inode, size, mtime, ctime)`` changed since it was last
hashed. Every write through the file system moves mtime and ctime, and putting an old mtime back
(``touch -d``, ``os.utime``) moves ctime, which no user can set: so any change made through the
kernel is seen at the next use. Damage that bypasses the file system (media bit rot) keeps the
stat key; the background scrub (a deep verify, every ``TENKI_SCRUB_INTERVAL_S``, of every kept
snapshot's artifacts, the built images' stored files, the files the live VMs run on, and the RAM
caches) and ``tenki admin verify`` re-hash regardless, so such damage is found within one scrub
period, and before that only if a restore or boot reads the file again.

Verified keys are kept in memory and in a small record per file (so a restarted server does not
re-hash a 300 MiB base image on its first restore).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from pathlib import Path

READ_CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class VerifiedKeys:
    """Remembers ``path -> (stat key, digest)`` for files whose content was hashed."""

    def __init__(self, record_dir: Path) -> None:
        self.directory = record_dir
        self._mem: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def _record(self, path: Path) -> Path:
        return self.directory / hashlib.sha256(str(path).encode()).hexdigest()[:32]

    def remember(self, path: Path, digest: str) -> None:
        key = stat_key(path)
        with self._lock:
            self._mem[str(path)] = (key, digest)
        self.directory.mkdir(parents=True, exist_ok=True)
        rec = self._record(path)
        tmp = rec.with_name(f".{rec.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(f"{key} {digest}")
        os.replace(tmp, rec)

    def known(self, path: Path) -> str | None:
        """The digest of ``path`` if it was hashed and has not changed since; else None."""
        try:
            key = stat_key(path)
        except OSError:
            return None
        with self._lock:
            cached = self._mem.get(str(path))
        if cached and cached[0] == key:
            return cached[1]
        try:
            stored_key, digest = self._record(path).read_text().split()
        except (OSError, ValueError):
            return None
        if stored_key != key:
            return None
        with self._lock:
            self._mem[str(path)] = (key, digest)
        return digest

    def digest(self, path: Path) -> str:
        """sha256 of ``path``, read again only if the file changed since it was last hashed."""
        known = self.known(path)
        if known is not None:
            return known
        digest = sha256_file(path)
        self.remember(path, digest)
        return digest

    def forget(self, path: Path) -> None:
        with self._lock:
            self._mem.pop(str(path), None)
        self._record(path).unlink(missing_ok=True)
