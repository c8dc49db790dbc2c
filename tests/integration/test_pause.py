"""Pause and resume with a real VM under TCG (issue 11): the VM is gone while paused, and the
resumed guest carries on: same processes (same PIDs), same tmpfs, the clock set to the host's,
its volume mounted again.

One session (cold-booted: no golden snapshot build runs beside it), terminated at the end.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tenkibox import Client, errors
from tenkibox.models import SessionState, SnapshotType


def _sh(session, cmd: str) -> str:  # type: ignore[no-untyped-def]
    return session.shell(cmd, timeout=60).check().stdout.strip()


def qemu_pids(session_id: str) -> list[int]:
    """Live (non-zombie) QEMU processes of one session, found by their ``-name``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True,
                         text=True).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and "qemu-system" in parts[2] and f"-name {session_id} " in parts[2] \
                and not parts[1].startswith("Z"):
            pids.append(int(parts[0]))
    return pids


def test_pause_releases_the_vm_and_resume_carries_on(client: Client) -> None:
    vol = client.create_volume("pause-data", "16MiB")
    s = client.create_and_wait(name="pause", memory_mb=1024, cold_boot=True, timeout=300,
                               volumes=[f"{vol.id}:/data"])
    try:
        _sh(s, "echo on-the-volume > /data/kept && sync")
        pid = _sh(s, "nohup sleep 1000 >/dev/null 2>&1 & echo $!")
        _sh(s, "echo shm-payload > /dev/shm/pause-test")
        hostname = _sh(s, "hostname")
        machine_id = _sh(s, "cat /etc/machine-id")
        before = qemu_pids(s.id)
        assert len(before) == 1

        assert s.pause(timeout=600).state == SessionState.PAUSED
        deadline = time.monotonic() + 15
        while qemu_pids(s.id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert qemu_pids(s.id) == []  # its memory went back to the host
        [snap] = [x for x in client.list_snapshots(s.id) if x.type == SnapshotType.PAUSE]
        assert snap.state.value == "READY" and snap.compressed_bytes > 0
        with pytest.raises(errors.ConflictError, match="paused"):
            s.exec("true")
        time.sleep(3)  # the guest's clock stands still meanwhile

        assert s.resume(timeout=300).state == SessionState.READY
        after = qemu_pids(s.id)
        assert len(after) == 1 and after != before  # a new QEMU, the same session id
        cmdline = _sh(s, f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
        assert cmdline.startswith("sleep 1000")
        assert _sh(s, "cat /dev/shm/pause-test") == "shm-payload"
        guest = float(_sh(s, "date +%s.%N"))
        assert abs(guest - time.time()) < 3  # corrected, not 3 s and a capture behind
        assert _sh(s, "hostname") == hostname  # the same guest, not a clone
        assert _sh(s, "cat /etc/machine-id") == machine_id
        # the volume stayed the session's while paused and is mounted again
        assert _sh(s, "cat /data/kept") == "on-the-volume"
        _sh(s, "echo after-resume > /data/more && sync")
        deadline = time.monotonic() + 30
        while client.get_snapshot(snap.id).state.value != "DELETED" \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get_snapshot(snap.id).state.value == "DELETED"  # released
    finally:
        s.terminate()
        client.delete_volume(vol.id)


def test_a_restored_session_is_paused_by_the_pages_it_wrote(client: Client,
                                                           tenki_server) -> None:
    """A session restored from a snapshot is paused by the pages it wrote since
    (``host/written.py``), however many: 200 MiB here, more than a running guest may have for
    that way. The resume is that guest, its data intact."""
    src = client.create_and_wait(name="pause-src", memory_mb=1024, cold_boot=True, timeout=300)
    try:
        seed = client.create_snapshot_and_wait(src.id, "pause-seed", timeout=300)
    finally:
        src.terminate()
    s = client.create_and_wait(snapshot_id=seed.id, name="pause-restored", timeout=300)
    try:
        _sh(s, "dd if=/dev/urandom of=/dev/shm/big bs=1M count=200 status=none")
        md5 = _sh(s, "md5sum /dev/shm/big").split()[0]
        pid = _sh(s, "nohup sleep 1000 >/dev/null 2>&1 & echo $!")
        assert s.pause(timeout=600).state == SessionState.PAUSED
        [snap] = [x for x in client.list_snapshots(s.id) if x.type == SnapshotType.PAUSE]
        log = (tenki_server.home / "server.log").read_text(errors="replace")
        assert f"{snap.id}: copy-written" in log, tenki_server.log_tail()
        assert f"{snap.id}: pre-copy" not in log
        assert s.resume(timeout=300).state == SessionState.READY
        assert _sh(s, "md5sum /dev/shm/big").split()[0] == md5
        assert _sh(s, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sleep 1000")
    finally:
        s.terminate()
        client.delete_snapshot(seed.id)
