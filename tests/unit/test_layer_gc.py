"""Layer-store garbage collection keeps what anything may still need."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tenkibox.engine.disks import collect_garbage, link_into


def _old(path: Path, data: bytes = b"x" * 4096) -> Path:
    path.write_bytes(data)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def test_unreferenced_old_layers_go_and_everything_else_stays(tmp_path: Path) -> None:
    store = tmp_path / "layers"
    store.mkdir()
    image = _old(tmp_path / "base.qcow2")
    base = link_into(store, image, "base-sandbox-1.qcow2")  # same inode, old mtime
    used = _old(store / "lyr_used.qcow2")
    unused = _old(store / "lyr_unused.qcow2")
    (store / ".lyr_unused.qcow2.sha256").write_text("k d")
    fresh = store / "lyr_fresh.qcow2"  # being created: no record names it yet
    fresh.write_bytes(b"y")
    freed = collect_garbage(store, {str(used)}, {image.stat().st_ino})
    assert freed > 0
    assert not unused.exists() and not (store / ".lyr_unused.qcow2.sha256").exists()
    assert used.exists() and fresh.exists() and base.exists()
