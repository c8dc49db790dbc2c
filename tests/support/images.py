"""Small real image directories and file damage, for the tests of the host's integrity checks
(no VM boots from them)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tenkibox.config import Layout
from tenkibox.images import builder

#: the files of a fake image, by kind (small, random: each test process has its own)
CONTENT = {"disk": b"QFI\xfb" + os.urandom(300_000), "kernel": b"MZ" + os.urandom(40_000),
           "initrd": b"070701" + os.urandom(20_000)}
#: their sha256, by kind
DIGESTS = {kind: hashlib.sha256(data).hexdigest() for kind, data in CONTENT.items()}


def flip_byte(path: Path, offset: int) -> None:
    """Damage one byte through the file system, putting the old mtime back (ctime moves)."""
    st = os.stat(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0xFF]))
    os.chmod(path, st.st_mode & 0o7777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_image(home: Path, image_id: str = "sandbox", *, digests: bool = True) -> Path:
    """An image as ``builder._build_locked`` leaves it (up to date with the guest sources);
    without ``digests``, as an older tenki built it."""
    d = Layout(home).image_dir(image_id)
    d.mkdir(parents=True)
    for kind, name in builder.BOOT_FILES.items():
        (d / name).write_bytes(CONTENT[kind])
    meta: dict[str, Any] = {"id": image_id, "size_bytes": 1, "packages": [],
                            "created_at": "2026-01-01T00:00:00+00:00",
                            "source_hash": builder.source_hash()}
    if digests:
        meta["sha256"] = DIGESTS
    (d / builder.META_FILE).write_text(json.dumps(meta))
    for p in d.iterdir():
        os.chmod(p, 0o444)
    return d
