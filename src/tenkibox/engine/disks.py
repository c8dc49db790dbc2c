"""qcow2 layers: overlays on top of frozen layers, and the files that stand under them.

A session disk is a chain ``base <- layer ... <- top``. Every file of a chain lives in the layer
store (``$TENKI_HOME/layers``) under a name that never changes, so the backing-file names recorded
in qcow2 headers stay valid when a session ends or a snapshot is deleted; files are removed only
when nothing (no live session, no snapshot) references them any more.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from pathlib import Path

from ..errors import InternalError


def run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InternalError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise InternalError(f"{what} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def create_overlay(path: Path, backing: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
        "creating the disk overlay")
    return path


def link_into(store: Path, src: Path, name: str) -> Path:
    """Hard-link an immutable file into the layer store (once) and return the stable path."""
    store.mkdir(parents=True, exist_ok=True)
    dest = store / name
    if not dest.exists():
        # sessions booting at once link the same file: each uses its own temporary name
        tmp = store / f".{name}.{secrets.token_hex(4)}"
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def file_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def collect_garbage(store: Path, referenced: set[str], keep_inodes: set[int] | None = None,
                    min_age_s: float = 120.0) -> int:
    """Delete layer-store files no record references; returns the bytes freed.

    Files younger than ``min_age_s`` are spared: a session being created has its overlay on
    disk a moment before its record names it. So are links of the current images
    (``keep_inodes``): a hard link keeps the image's old mtime, and the next boot uses it.
    """
    import time

    freed = 0
    if not store.exists():
        return 0
    now = time.time()
    for entry in list(store.iterdir()):
        if entry.name.startswith(".") or str(entry) in referenced:
            continue
        with contextlib.suppress(OSError):
            st = entry.stat()
            if now - st.st_mtime < min_age_s or st.st_ino in (keep_inodes or ()):
                continue
        freed += allocated_bytes(entry)
        with contextlib.suppress(OSError):
            entry.unlink()
    for side in store.glob(".*.sha256"):  # a digest kept beside a layer goes with it
        if not side.with_name(side.name[1:].removesuffix(".sha256")).exists():
            with contextlib.suppress(OSError):
                side.unlink()
    return freed
