"""Captures of a running guest with real VMs under TCG (issue 13): saved live (stopped only for the
last pages) or, restored from a snapshot, by the pages it wrote (stopped while they are copied);
what is restored is the guest as it was.

Before the RAM pad (``engine.machine.TCG_RAM_PAD``), QEMU 7.2's dirty tracking lost writes the
guest kernel made through its TLB during the copy; a snapshot of a session restored from a
snapshot then crashed at once after its own restore (hrtimer corruption, RCU stalls, a kernel
panic and a reboot: every time in three runs of this chain). Here each generation is captured
from the previous generation's restored session while a writer keeps dirtying memory and a
counter keeps ticking, and each restore must continue that same guest: the counter goes on from
where it was, a file in tmpfs (RAM only) is intact, and the kernel logged no crash.
"""

from __future__ import annotations

import re
import time

import pytest

from tenkibox import Client
from tenkibox.engine import writetrack
from tenkibox.host import written

GENERATIONS = 3
# what a guest whose memory came back damaged logs (a restore that reboots would lose the
# counter and the tmpfs file too)
CRASH = r"Kernel panic|BUG:|Oops|rcu.*stall|general protection fault"


def _sh(session, cmd: str) -> str:  # type: ignore[no-untyped-def]
    return session.shell(cmd, timeout=120).check().stdout.strip()


def _count(session) -> int:  # type: ignore[no-untyped-def]
    return int(_sh(session, "cat /tmp/count"))


@pytest.fixture(scope="module")
def busy(client: Client):  # type: ignore[no-untyped-def]
    """A session with 64 MiB of random data in tmpfs, a writer rewriting 16 MiB over and over,
    and a counter ticking every 0.1 s; yields (session, md5 of the tmpfs data)."""
    s = client.create_and_wait(name="live-capture", memory_mb=1024, timeout=300)
    try:
        _sh(s, "dd if=/dev/urandom of=/dev/shm/blob bs=1M count=64 status=none")
        md5 = _sh(s, "md5sum /dev/shm/blob").split()[0]
        _sh(s, "nohup sh -c 'while :; do dd if=/dev/urandom of=/dev/shm/w bs=1M count=16 "
               "status=none; done' >/dev/null 2>&1 &")
        _sh(s, "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
               "mv /tmp/count.new /tmp/count; sleep 0.1; done' >/dev/null 2>&1 &")
        deadline = time.monotonic() + 60
        while "count" not in _sh(s, "ls /tmp") and time.monotonic() < deadline:
            time.sleep(0.2)
        yield s, md5
    finally:
        s.terminate()


@pytest.mark.parametrize("way", ["live", "written"])
def test_a_chain_of_captures_restores_the_running_guest(client: Client, tenki_server, busy,
                                                        way: str) -> None:
    """The first generation's source is the booted session: captured by the pages it
    touched, its RAM a memfd (``MachineConfig.ram_shared``). From the second generation on,
    ``live``: saved live (each restored source first writes more than ``written.limit``);
    ``written``: by the pages the restored source wrote (``host/written.py``). The guest is
    stopped while pages are copied, the writer going on around it."""
    assert writetrack.available() is None, "this machine's kernel tracks writes (Linux 6.7)"
    source, md5 = busy
    restored = []
    try:
        for gen in range(GENERATIONS):
            if way == "live":  # too much written for a stop while it is copied
                # (more than tmpfs takes in this guest: a process's memory, written once; the
                # pages stay written in QEMU after the process frees them)
                _sh(source, f"python3 -c 'b = bytes(range(256)) * "
                            f"({written.limit(1 << 30) // 2**20 + 16} << 12)'")
            before = _count(source)
            snap = client.create_snapshot_and_wait(source.id, f"{way}-{gen}", timeout=300)
            log = (tenki_server.home / "server.log").read_text(errors="replace")
            if way == "live" and gen > 0:
                # saved live: QEMU's pre-copy ran, no stop-and-copy ``pause`` step
                assert f"{snap.id}: pre-copy" in log, tenki_server.log_tail()
                assert f"{snap.id}: pause " not in log
            else:  # a booted source by the pages it touched, however many
                assert f"{snap.id}: copy-written" in log, tenki_server.log_tail()
                assert f"{snap.id}: pre-copy" not in log
                # the source's writes are tracked (booted or restored): its pages are copied
                # ahead, and the stop copies only what the writer wrote since
                assert f"{snap.id}: copy-ahead" in log, tenki_server.log_tail()
            clone = client.create_and_wait(snapshot_id=snap.id, name=f"live-clone-{gen}",
                                           timeout=300)
            restored.append(clone)
            first = _count(clone)
            assert first >= before, (gen, before, first)
            deadline = time.monotonic() + 60
            while _count(clone) <= first and time.monotonic() < deadline:
                time.sleep(0.3)
            assert _count(clone) > first, f"generation {gen}: the counter stopped"
            assert _sh(clone, "md5sum /dev/shm/blob").split()[0] == md5
            crashes = _sh(clone, "dmesg | grep -E '" + CRASH + "' || true")
            assert not re.search(CRASH, crashes), f"generation {gen}: {crashes}"
            source = clone  # the next generation is captured from a restored session
    finally:
        for s in restored:
            s.terminate()
