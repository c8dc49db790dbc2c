"""Spares with real VMs under TCG: the next restore of a snapshot prepared ahead, claimed by the
restore that gets its session id (``host/spares.py``, ``control/spares.py``).

One server and one source session serve the module; the tests that kill or restart the server
come last. A spare is found by its QEMU (its command line names its session id) and by the
server's log, which names each spare when it is ready.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.counter import COUNTER

from tenkibox import Client

SERVER_ENV = {"TENKI_SPARES": "on"}
READY = re.compile(r"spare (ses_\w+) of (snp_\w+): ready in")


def _sh(session, cmd: str) -> str:
    return session.shell(cmd, timeout=60).check().stdout.strip()


def _qemu_pid(session_id: str) -> int | None:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "qemu-system" in line and f"-name {session_id} " in line:
            return int(line.split()[0])
    return None


def _started_at(pid: int) -> float:
    """When process ``pid`` started, in ``time.time()`` terms."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _log_end(server) -> int:
    return (server.home / "server.log").stat().st_size


def _ready_spare(server, snapshot_id: str, since: int, timeout: float = 60.0) -> str:
    """The session id of the first spare of ``snapshot_id`` that the server's log says is
    ready after its first ``since`` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(server.home / "server.log", "rb") as f:
            f.seek(since)
            log = f.read().decode(errors="replace")
        ready = [sid for sid, snap in READY.findall(log) if snap == snapshot_id]
        if ready:
            return ready[0]
        time.sleep(0.1)
    raise AssertionError(f"no spare of {snapshot_id} got ready: {server.log_tail()}")


def _gone(session_id: str, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while _qemu_pid(session_id) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def source(client: Client):
    s = client.create_and_wait(name="source", memory_mb=512, timeout=300)
    _sh(s, COUNTER)
    _sh(s, "echo on-disk > /root/d.txt")
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def snap(client: Client, source):
    return client.create_snapshot_and_wait(source.id, "spared", timeout=300)


def test_the_next_restore_claims_a_spare_prepared_before_it_was_asked(
        client: Client, tenki_server, source, snap) -> None:
    since = _log_end(tenki_server)
    first = client.create_and_wait(snapshot_id=snap.id, name="first", timeout=120)
    try:
        spare = _ready_spare(tenki_server, snap.id, since)
        pid = _qemu_pid(spare)
        assert pid is not None, "the spare's QEMU runs"
        asked = time.time()
        since = _log_end(tenki_server)
        second = client.create_and_wait(snapshot_id=snap.id, name="second", timeout=120)
    finally:
        first.terminate()
    try:
        # the restore got the spare's session id, and ran in the QEMU started before it
        assert second.id == spare
        assert _qemu_pid(second.id) == pid and _started_at(pid) < asked - 0.2
        # it continues from the captured instant, as a restore run whole does
        assert _sh(second, "cat /root/d.txt") == "on-disk"
        assert int(_sh(second, "cat /tmp/count")) > 0
        # with its own identity (set at the claim, not at the preparation) and a clock that
        # is the host's, though the guest waited paused
        assert _sh(second, "hostname") == f"tenki-{second.id.split('_', 1)[1][:8]}"
        assert _sh(second, "hostname") != _sh(source, "hostname")
        assert _sh(second, "cat /etc/machine-id") != _sh(source, "cat /etc/machine-id")
        assert abs(float(_sh(second, "date +%s.%N")) - time.time()) < 3
        # its network: the DNS forwarder of its own namespace answers
        assert second.shell("getent hosts deb.debian.org", timeout=30).exit_code == 0
        # a restore's steps in the log: the claim's, not a launch
        log = (tenki_server.home / "server.log").read_text(errors="replace")
        assert re.search(rf"{second.id} from {snap.id}: spare ", log)
        assert not re.search(rf"{second.id} from {snap.id}: launch ", log)
        # and the next restore's spare is prepared in turn
        assert _ready_spare(tenki_server, snap.id, since) != second.id
    finally:
        second.terminate()
    assert _gone(second.id)


def test_a_spare_whose_qemu_died_is_restored_whole(client: Client, tenki_server,
                                                    snap) -> None:
    since = _log_end(tenki_server)
    client.create_and_wait(snapshot_id=snap.id, timeout=120).terminate()
    spare = _ready_spare(tenki_server, snap.id, since)
    pid = _qemu_pid(spare)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _gone(spare)
    r = client.create_and_wait(snapshot_id=snap.id, name="after-a-dead-spare", timeout=120)
    try:
        assert r.id == spare
        assert _sh(r, "cat /root/d.txt") == "on-disk"
        log = (tenki_server.home / "server.log").read_text(errors="replace")
        assert f"{spare}: its spare is not used" in log
        assert re.search(rf"{spare} from {snap.id}: launch ", log)
    finally:
        r.terminate()
    assert _gone(r.id)


def test_deleting_a_snapshot_stops_its_spare(client: Client, tenki_server, run_root,
                                             source) -> None:
    other = client.create_snapshot_and_wait(source.id, "to-delete", timeout=300)
    since = _log_end(tenki_server)
    client.create_and_wait(snapshot_id=other.id, timeout=120).terminate()
    spare = _ready_spare(tenki_server, other.id, since)
    assert _qemu_pid(spare) is not None
    client.delete_snapshot(other.id)
    assert _gone(spare), "the spare of a deleted snapshot is stopped"
    deadline = time.monotonic() + 10
    while list(run_root.glob(f"*/{spare}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(run_root.glob(f"*/{spare}")), "its run directory is removed"
    assert not (tenki_server.home / "host" / "disks" / spare).exists()


def test_a_server_stop_stops_the_spares_and_a_crash_leaves_none(client: Client, tenki_server,
                                                                snap) -> None:
    since = _log_end(tenki_server)
    client.create_and_wait(snapshot_id=snap.id, timeout=120).terminate()
    spare = _ready_spare(tenki_server, snap.id, since)
    tenki_server.stop()
    assert _gone(spare, timeout=1.0), "a stopped server leaves no spare running"
    tenki_server.start()
    with tenki_server.client() as c:
        since = _log_end(tenki_server)
        r = c.create_and_wait(snapshot_id=snap.id, timeout=120)
        assert r.id != spare  # (its note went with the server)
        assert _sh(r, "cat /root/d.txt") == "on-disk"
        r.terminate()
        spare = _ready_spare(tenki_server, snap.id, since)
    tenki_server.kill9()
    assert _qemu_pid(spare) is not None  # nothing stopped it: its server died
    tenki_server.start()
    # no record names it: the restarted server's recovery kills it with the other strays
    assert _gone(spare)
    with tenki_server.client() as c:
        again = c.create_and_wait(snapshot_id=snap.id, timeout=120)
        assert again.id != spare
        assert _sh(again, "cat /root/d.txt") == "on-disk"
        again.terminate()
