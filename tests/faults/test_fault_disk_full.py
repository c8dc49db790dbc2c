"""A full data directory during a capture: the snapshot FAILED with "No space left", the session
unharmed, nothing left behind, and a capture works again once there is room.

The whole ``$TENKI_HOME`` is a small tmpfs (the image copied in): wherever the layout puts
snapshot files, they land on the full file system. A ballast file leaves ~4 MiB free before the
capture; the guest holds 48 MiB of random data in /dev/shm, which cannot compress below that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faultlib as fl
import pytest

from tenkibox import errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MiB = 1 << 20
FREE_MIB = 4


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture(scope="module")
def server(image_layout: Any) -> Iterator[fl.FaultServer]:
    home = Path(tempfile.mkdtemp(prefix="test_fault_disk_full-", dir=fl.it.TMP_ROOT))
    images = sum(p.stat().st_size for p in image_layout.images.rglob("*") if p.is_file())
    size_mib = images // MiB + 256
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tenki-faults-full",
                    str(home)], check=True)
    server = fl.FaultServer(home)
    try:
        shutil.copytree(image_layout.images, home / "images",
                        ignore=shutil.ignore_patterns("*.lock", ".*"))
        server.start()
        yield server
    finally:
        server.cleanup()
        subprocess.run(["umount", "-l", str(home)], check=False)
        with contextlib.suppress(OSError):
            home.rmdir()


def test_full_disk_fails_the_capture_not_the_session(server: fl.FaultServer,
                                                     client: Any) -> None:
    home = Path(server.home)
    s = fl.new_source(client, "full-source")
    fl.sh(s, f"head -c 48M /dev/urandom > {fl.SHM_PATH}")
    ballast = home / "ballast"
    with open(ballast, "wb") as f:
        left = _free(home) - FREE_MIB * MiB
        block = b"\xa5" * MiB
        while left > 0:
            f.write(block[:min(MiB, left)])
            left -= MiB
    try:
        assert _free(home) <= (FREE_MIB + 1) * MiB
        snap = client.create_snapshot(s.id, "no-room")
        with pytest.raises(errors.SnapshotFailedError, match="No space left"):
            client.wait_snapshot_ready(snap.id, timeout=300)
        got = client.get_snapshot(snap.id)
        assert got.state.value == "FAILED" and "No space left" in (got.state_reason or ""), got
        # nothing of the failed capture is left on the full file system
        assert _free(home) >= (FREE_MIB - 1) * MiB, \
            f"only {_free(home) // 1024} KiB free after the failed capture: files left behind"
    finally:
        ballast.unlink()
    # the session is unharmed: running, not paused, its files there
    rec = fl.get_session(server, s.id)
    assert rec["state"] in fl.LIVE, rec
    assert fl.counting(s), "the session is paused after the failed capture"
    assert s.files.read_text(fl.MARKER_PATH) == fl.MARKER
    fl.sh(s, "echo after > /root/after.txt && sync")
    with pytest.raises(errors.SnapshotFailedError):
        client.create_and_wait(snapshot_id=snap.id, timeout=60)
    fl.assert_settled(server)
    # room again: a capture works
    ok = client.create_snapshot_and_wait(s.id, "room-again", timeout=300)
    assert ok.state.value == "READY"
    fl.assert_settled(server)
    client.delete_snapshot(ok.id)
    s.terminate()
