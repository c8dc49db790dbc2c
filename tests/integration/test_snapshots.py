"""Snapshots with real VMs under TCG: capture, restore, errors, faults (issue 3).

One server and one source session serve the whole module (a TCG boot costs ~10 s); tests that
kill or restart the server come last, in file order.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from support.counter import COUNTER
from support.pagecache import PAGE, resident
from support.server import AUTH

from tenkibox import Client, errors

HELLO = b"#!/bin/sh\necho hello from the save point\n"


def _json(proc: subprocess.CompletedProcess[bytes]) -> dict:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def _err(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = proc.stderr.decode()
    assert "Traceback" not in text, text
    return text


def _sh(session, cmd: str) -> str:
    return session.shell(cmd, timeout=60).check().stdout.strip()


@pytest.fixture(scope="module")
def source(client: Client):
    """A session with a counting process, a file on disk and a file on a fresh tmpfs."""
    s = client.create_and_wait(name="source", memory_mb=1024, timeout=300)
    _sh(s, COUNTER)
    _sh(s, "mkdir -p /mnt/scratch && mount -t tmpfs scratch /mnt/scratch && "
           "echo tmpfs-payload > /mnt/scratch/t.txt && echo disk-payload > /root/d.txt")
    s.files.write("/usr/local/bin/tenki-hello", HELLO, mode=0o755)
    time.sleep(1.5)
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def snap(client: Client, source):
    before = int(_sh(source, "cat /tmp/count"))
    snapshot = client.create_snapshot_and_wait(source.id, "baseline", timeout=300)
    after = int(_sh(source, "cat /tmp/count"))
    return snapshot, before, after


def test_record_is_ready_with_true_sizes(client: Client, snap, source) -> None:
    s, _, _ = snap
    got = client.get_snapshot(s.id)
    assert got.id.startswith("snp_") and got.state.value == "READY"
    assert got.session_id == source.id and got.name == "baseline"
    assert got.base_image_id == "sandbox"
    assert got.memory_bytes == 1024 << 20
    # only touched, non-zero memory and the new disk layer are stored, compressed
    assert 0 < got.compressed_bytes < got.size_bytes < got.memory_bytes + (512 << 20)
    assert got.ready_at is not None and got.created_at <= got.ready_at
    assert got.expires_at is None
    assert got.id in {x.id for x in client.list_snapshots(session_id=source.id)}


def test_source_runs_on_unchanged(snap, source) -> None:
    _, _, after = snap
    time.sleep(1.2)
    assert int(_sh(source, "cat /tmp/count")) > after
    assert _sh(source, "cat /mnt/scratch/t.txt /root/d.txt") == "tmpfs-payload\ndisk-payload"
    source.files.write("/root/after-snapshot.txt", b"later")


def test_restore_continues_from_the_captured_instant(client: Client, snap, source) -> None:
    s, before, after = snap
    r = client.create_and_wait(snapshot_id=s.id, name="copy", timeout=120)
    try:
        assert r.record.snapshot_id == s.id
        assert r.record.cpu == source.record.cpu and r.record.memory_mb == 1024
        pid = _sh(r, "cat /root/counter.pid")
        assert pid == _sh(source, "cat /root/counter.pid")
        assert _sh(r, f"test -d /proc/{pid} && cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith(
            "sh -c")
        first = int(_sh(r, "cat /tmp/count"))
        assert before <= first <= after + 4  # it went on from where it was captured
        time.sleep(1.5)
        assert int(_sh(r, "cat /tmp/count")) > first
        assert _sh(r, "cat /mnt/scratch/t.txt /root/d.txt") == "tmpfs-payload\ndisk-payload"
        assert _sh(r, "tenki-hello") == "hello from the save point"
        # written by the source after the capture: not in the copy
        assert r.exec("test", "-e", "/root/after-snapshot.txt").exit_code == 1
        # the clock is corrected at once, not left behind by the snapshot's age
        guest = float(_sh(r, "date +%s.%N"))
        assert abs(guest - time.time()) < 3
        # a new identity
        assert _sh(r, "hostname") != _sh(source, "hostname")
        assert _sh(r, "cat /etc/machine-id") != _sh(source, "cat /etc/machine-id")
        # a thread per vCPU, or one for both when the suite's other VMs take the host's
        # cores (restore.warm_exec_path: the warm-up runs only with the former; agentd's
        # warm-up is tested with the binary itself in tests/unit/test_agent_protocol.py)
        argv = _qemu_argv(r.id)
        accel = argv[argv.index(b"-accel") + 1]
        assert accel in (b"tcg,thread=multi", b"tcg,thread=single"), accel
        # agentd keeps no warm-up process: it has no child when idle
        # (the shell that looks is one: it is left out)
        agentd = _sh(r, "pidof agentd")
        assert _sh(r, f"cat /proc/{agentd}/task/*/children | tr -s ' ' '\\n' | "
                      "grep -v -x -e '' -e $$ | wc -l") == "0"
        # the network works after a restore
        assert r.shell("getent hosts deb.debian.org", timeout=30).exit_code == 0
    finally:
        r.terminate()


def test_several_restores_at_once_are_independent(client: Client, snap) -> None:
    s, _, _ = snap
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        sessions = list(pool.map(
            lambda i: client.create_and_wait(snapshot_id=s.id, name=f"clone{i}", timeout=300),
            range(3)))
    try:
        for i, c in enumerate(sessions):
            c.files.write("/root/mine.txt", f"clone {i}")
        for i, c in enumerate(sessions):
            assert c.files.read_text("/root/mine.txt") == f"clone {i}"
            assert int(_sh(c, "cat /tmp/count")) > 0
        assert len({_sh(c, "hostname") for c in sessions}) == 3
        assert len({_sh(c, "cat /etc/machine-id") for c in sessions}) == 3
        assert len({_sh(c, "head -c 16 /dev/urandom | od -An -tx1") for c in sessions}) == 3
    finally:
        for c in sessions:
            c.terminate()


def test_a_restored_clone_sends_only_its_announcements(client: Client, source) -> None:
    """A clone that nobody asked to send a packet sends QEMU's announcements of a migrated VM
    (``announce-rounds``, 5: virtio-net asks the guest for a gratuitous ARP each round) and
    nothing else: none of the IPv6 chatter whose timers a snapshot leaves pending (eth0 has no
    IPv6). Setting ``announce-rounds`` to 0 would spare the guest those, but QEMU 7.2 then frees
    virtio-net's announce timer and crashes (SIGSEGV) at the guest's next reset: the reboot
    test below found it."""
    tx = "cat /sys/class/net/eth0/statistics/tx_packets"
    before = int(_sh(source, tx))
    quiet = client.create_snapshot_and_wait(source.id, "quiet", timeout=300)
    clone = client.create_and_wait(snapshot_id=quiet.id, name="quiet", timeout=300)
    try:
        time.sleep(2.0)  # QEMU's announcements end within ~1 s of the restore
        assert int(_sh(clone, tx)) - before == 5
    finally:
        clone.terminate()
        client.delete_snapshot(quiet.id)


def test_a_restored_guest_that_reboots_powers_off(client: Client, snap) -> None:
    s, _, _ = snap
    r = client.create_and_wait(snapshot_id=s.id, name="reboots", timeout=120)
    try:
        # launched with the kernel stub (engine/kernelstub.py), not the image's kernel
        argv = _qemu_argv(r.id)
        assert b"-initrd" not in argv
        assert argv[argv.index(b"-kernel") + 1].endswith(b"/kernel-stub")
        r.start("sh", "-c", "echo b > /proc/sysrq-trigger")  # an immediate reboot
        deadline = time.monotonic() + 60
        while r.refresh().state.value not in ("FAILED", "TERMINATED"):
            assert time.monotonic() < deadline, "the rebooted guest still runs"
            time.sleep(0.5)
        assert "powered off" in (r.record.state_reason or ""), r.record.state_reason
    finally:
        r.terminate()


def _qemu_argv(session_id: str) -> list[bytes]:
    return Path(f"/proc/{_qemu_pid(session_id)}/cmdline").read_bytes().split(b"\0")


def _qemu_pid(session_id: str) -> int:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "qemu-system" in line and f"-name {session_id} " in line:
            return int(line.split()[0])
    raise AssertionError(f"no QEMU for {session_id}")


def _shared_kib(pid: int, path_part: str) -> int:
    """Pages of the mapping whose path contains ``path_part`` that another process maps too
    (Shared_Clean + Shared_Dirty: the unpacked cache may not be written back yet)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = path_part in line
        elif inside and line.startswith(("Shared_Clean:", "Shared_Dirty:")):
            total += int(line.split()[1])
    return total


def test_clones_share_the_snapshots_pages_on_the_host(client: Client, snap) -> None:
    s, _, _ = snap
    a = client.create_and_wait(snapshot_id=s.id, timeout=120)
    b = client.create_and_wait(snapshot_id=s.id, timeout=120)
    try:
        for c in (a, b):
            _sh(c, "cat /tmp/count >/dev/null; ls / >/dev/null")
        shared = [_shared_kib(_qemu_pid(c.id), "/host/ram-cache/") for c in (a, b)]
        assert all(kib > 10 * 1024 for kib in shared), shared  # tens of MiB mapped by both
    finally:
        a.terminate()
        b.terminate()


def test_a_restored_session_can_be_snapshotted_and_restored_again(client: Client, snap) -> None:
    s, _, _ = snap
    first = client.create_and_wait(snapshot_id=s.id, timeout=120)
    try:
        first.files.write("/root/second.txt", "from the restored session")
        _sh(first, "head -c 20M /dev/urandom > /dev/shm/blob && md5sum /dev/shm/blob > /root/sum")
        pid = _sh(first, "cat /root/counter.pid")
        again = client.create_snapshot_and_wait(first.id, "second-generation", timeout=300)
        assert again.state.value == "READY"
        before = int(_sh(first, "cat /tmp/count"))
        time.sleep(1.2)
        assert int(_sh(first, "cat /tmp/count")) > before  # it runs on after the capture
        # a second snapshot of the same session stands alone: its newest layer's header still
        # names the file it was frozen over, in the session's directory, which goes with it
        later = client.create_snapshot_and_wait(first.id, "second-generation-later",
                                                timeout=300)
        first.terminate()
        second = client.create_and_wait(snapshot_id=later.id, timeout=120)
        try:
            assert second.files.read_text("/root/second.txt") == "from the restored session"
            assert _sh(second, "md5sum /dev/shm/blob") == _sh(second, "cat /root/sum")
            assert _sh(second, "cat /root/counter.pid") == pid
            assert _sh(second, "cat /root/d.txt") == "disk-payload"
        finally:
            second.terminate()
        client.delete_snapshot(later.id)
        client.delete_snapshot(again.id)
    finally:
        first.terminate()


def _ram_cache_of(session_id: str) -> Path:
    """The RAM cache file a clone's QEMU maps."""
    for line in Path(f"/proc/{_qemu_pid(session_id)}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "/host/ram-cache/" in fields[5]:
            return Path(fields[5].strip())
    raise AssertionError(f"{session_id} maps no RAM cache")


def test_a_cache_keeps_in_memory_only_what_clones_use(client: Client, snap) -> None:
    """64 MiB in the guest's tmpfs that no clone reads are let go of from the host's page
    cache once a clone ran; the next clone reads them back from the disk, intact."""
    s, _, _ = snap
    first = client.create_and_wait(snapshot_id=s.id, timeout=120)
    try:
        _sh(first, "head -c 64M /dev/urandom > /dev/shm/cold && md5sum /dev/shm/cold > /root/cold")
        big = client.create_snapshot_and_wait(first.id, "with-cold-pages", timeout=300)
    finally:
        first.terminate()
    try:
        a = client.create_and_wait(snapshot_id=big.id, timeout=120)
        try:
            _sh(a, "true")
            cache = _ram_cache_of(a.id)
        finally:
            a.terminate()
        data = cache.stat().st_blocks * 512
        deadline = time.monotonic() + 60
        while (kept := len(resident(cache)) * PAGE) > data - (64 << 20):
            assert time.monotonic() < deadline, (kept, data)
            time.sleep(0.5)
        b = client.create_and_wait(snapshot_id=big.id, timeout=120)
        try:
            assert _sh(b, "md5sum /dev/shm/cold") == _sh(b, "cat /root/cold")
            assert int(_sh(b, "cat /tmp/count")) > 0
        finally:
            b.terminate()
    finally:
        client.delete_snapshot(big.id)


def test_two_snapshots_of_one_session_at_once_are_serialised(client: Client, source) -> None:
    a = client.create_snapshot(source.id, "twin-a")
    b = client.create_snapshot(source.id, "twin-b")
    a = client.wait_snapshot_ready(a.id, timeout=300)
    b = client.wait_snapshot_ready(b.id, timeout=300)
    assert a.state.value == b.state.value == "READY"
    assert int(_sh(source, "cat /tmp/count")) > 0
    for x in (a, b):
        client.delete_snapshot(x.id)


def test_save_point_pattern_with_the_cli(tenki_server) -> None:
    """The spec's pattern: create, install, snapshot, terminate, restore: the tool is there."""
    sid = _json(tenki_server.cli("sandbox", "create", "--name", "debugbox", "--memory-mb",
                                 "1024", "--json"))["id"]
    tool = Path(os.environ.get("TMPDIR", "/tmp")) / f"tool-{sid}"
    tool.write_bytes(b"#!/bin/sh\necho strace-like tool $1\n")
    try:
        assert tenki_server.cli("sandbox", "files", "write", "--session", sid,
                                "/usr/local/bin/mytool", str(tool)).returncode == 0
        assert tenki_server.cli("sandbox", "exec", "--session", sid, "chmod", "+x",
                                "/usr/local/bin/mytool").returncode == 0
    finally:
        tool.unlink()
    snap = _json(tenki_server.cli("sandbox", "snapshot", "create", "--session", sid, "--name",
                                  "with-tool", "--wait-timeout", "10m", "--json"))
    assert snap["state"] == "READY" and snap["name"] == "with-tool"
    got = _json(tenki_server.cli("sandbox", "snapshot", "get", snap["id"], "--json"))
    for key in ("id", "session_id", "workspace_id", "name", "state", "size_bytes",
                "compressed_bytes", "memory_bytes", "base_image_id", "created_at", "expires_at"):
        assert key in got
    assert tenki_server.cli("sandbox", "terminate", "--session", sid).returncode == 0
    restored = _json(tenki_server.cli("sandbox", "snapshot", "restore", snap["id"], "--name",
                                      "debugbox-restored", "--json"))
    assert restored["name"] == "debugbox-restored" and restored["state"] in ("READY", "RUNNING")
    out = tenki_server.cli("sandbox", "exec", "--session", restored["id"], "mytool", "ok")
    assert out.returncode == 0 and out.stdout.decode().strip() == "strace-like tool ok"
    # the same through the underlying create call
    again = _json(tenki_server.cli("sandbox", "create", "--snapshot", snap["id"], "--json"))
    assert again["snapshot_id"] == snap["id"]
    listed = _json(tenki_server.cli("sandbox", "snapshot", "list", "--json"))
    assert snap["id"] in {x["id"] for x in listed}
    # delete: restored sessions keep working, the record says DELETED, restore is refused
    assert tenki_server.cli("sandbox", "snapshot", "delete", snap["id"]).returncode == 0
    deadline = time.monotonic() + 30
    while _json(tenki_server.cli("sandbox", "snapshot", "get", snap["id"], "--json"))[
            "state"] != "DELETED":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    for sess in (restored["id"], again["id"]):
        out = tenki_server.cli("sandbox", "exec", "--session", sess, "sh", "-c",
                               "mytool x && echo more > /root/more && sync && cat /root/more")
        assert out.returncode == 0 and b"more" in out.stdout
    refused = tenki_server.cli("sandbox", "snapshot", "restore", snap["id"])
    assert refused.returncode != 0 and "DELETED" in _err(refused)
    assert snap["id"] not in {x["id"] for x in _json(
        tenki_server.cli("sandbox", "snapshot", "list", "--json"))}
    for sess in (restored["id"], again["id"]):
        tenki_server.cli("sandbox", "terminate", "--session", sess)


def test_unknown_ids_are_not_found(tenki_server, client: Client) -> None:
    for args in (["snapshot", "get", "snp_x"], ["snapshot", "delete", "snp_x"],
                 ["snapshot", "restore", "snp_x"], ["create", "--snapshot", "snp_x"]):
        proc = tenki_server.cli("sandbox", *args)
        assert proc.returncode != 0
        assert "snapshot snp_x not found" in _err(proc)
    proc = tenki_server.cli("sandbox", "snapshot", "create", "--session", "ses_x", "--name", "n")
    assert proc.returncode != 0 and "session ses_x not found" in _err(proc)
    resp = httpx.get(f"{tenki_server.url}/v1/snapshots/snp_x", headers=AUTH)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "SnapshotNotFound"
    with pytest.raises(errors.SnapshotNotFoundError):
        client.get_snapshot("snp_x")


def test_snapshot_of_a_session_that_is_not_running_is_a_conflict(client: Client,
                                                                  tenki_server) -> None:
    s = client.create_and_wait(memory_mb=512, timeout=300)
    s.terminate()
    proc = tenki_server.cli("sandbox", "snapshot", "create", "--session", s.id, "--name", "x")
    assert proc.returncode != 0 and "TERMINATED" in _err(proc)
    with pytest.raises(errors.ConflictError, match="TERMINATED"):
        client.create_snapshot(s.id, "x")


def test_expiry(client: Client, tenki_server, source) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    proc = tenki_server.cli("sandbox", "snapshot", "create", "--session", source.id,
                            "--name", "old", "--expires-at", past)
    assert proc.returncode == 2 and "expires-at" in _err(proc)
    resp = httpx.post(f"{tenki_server.url}/v1/snapshots",
                      json={"session_id": source.id, "expires_at": past}, headers=AUTH)
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "expires_at"
    soon = datetime.now(UTC) + timedelta(seconds=8)
    s = client.create_snapshot_and_wait(source.id, "short-lived", expires_at=soon, timeout=300)
    assert s.expires_at is not None
    own = [tenki_server.artifacts(s.id)[k] for k in ("ram", "state")]
    assert all(p.exists() for p in own)
    deadline = time.monotonic() + 60
    while client.get_snapshot(s.id).state.value != "DELETED":
        assert time.monotonic() < deadline, client.get_snapshot(s.id)
        time.sleep(0.5)
    while any(p.exists() for p in own):  # its space is freed
        assert time.monotonic() < deadline, own
        time.sleep(0.5)


def test_wait_timeout_says_still_creating(tenki_server, client: Client, source) -> None:
    proc = tenki_server.cli("sandbox", "snapshot", "create", "--session", source.id, "--name",
                            "slow", "--wait-timeout", "1ms")
    assert proc.returncode != 0
    text = _err(proc)
    assert "still CREATING" in text
    sid = re.search(r"snp_[0-9a-z]+", text)
    assert sid, text
    assert client.wait_snapshot_ready(sid.group(0), timeout=300).state.value == "READY"
    client.delete_snapshot(sid.group(0))


def test_corrupt_or_missing_files_fail_the_restore(client: Client, tenki_server, source) -> None:
    s = client.create_snapshot_and_wait(source.id, "to-corrupt", timeout=300)
    ram = tenki_server.artifacts(s.id)["ram"]
    data = bytearray(ram.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ram.write_bytes(bytes(data))
    before = {x.id for x in client.list()}
    # refused before any session exists, naming the damaged file; the snapshot is FAILED now
    with pytest.raises(errors.SnapshotFailedError, match=f"RAM image {ram.name[:12]} is corrupt"):
        client.create_and_wait(snapshot_id=s.id, timeout=120)
    got = client.get_snapshot(s.id)
    assert got.state.value == "FAILED" and "damaged in storage" in (got.state_reason or "")
    proc = tenki_server.cli("sandbox", "snapshot", "restore", s.id)
    assert proc.returncode != 0 and "FAILED" in _err(proc) and _err(proc).count("\n") == 1
    s2 = client.create_snapshot_and_wait(source.id, "to-lose", timeout=300)
    tenki_server.artifacts(s2.id)["state"].unlink()
    with pytest.raises(errors.SnapshotFailedError, match=r"device state [0-9a-f]{12} is missing"):
        client.create_and_wait(snapshot_id=s2.id, timeout=120)
    # nothing half-started is left behind
    assert {x.id for x in client.list()} == before
    for x in (s, s2):
        client.delete_snapshot(x.id)


def test_full_data_directory_fails_the_snapshot_not_the_session(client: Client, tenki_server,
                                                                source) -> None:
    sdir = tenki_server.home / "artifacts" / "sha256"  # where a capture stores its files
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tenki-full", str(sdir)],
                   check=True)
    try:
        _sh(source, "head -c 48M /dev/urandom > /dev/shm/noise")  # more than 4 MiB compressed
        s = client.create_snapshot(source.id, "no-room")
        with pytest.raises(errors.SnapshotFailedError, match="No space left"):
            client.wait_snapshot_ready(s.id, timeout=300)
        got = client.get_snapshot(s.id)
        assert got.state.value == "FAILED" and "No space left" in (got.state_reason or "")
        first = int(_sh(source, "cat /tmp/count"))
        time.sleep(1.2)
        assert int(_sh(source, "cat /tmp/count")) > first
        with pytest.raises(errors.SnapshotFailedError):
            client.create_and_wait(snapshot_id=s.id, timeout=60)
    finally:
        _sh(source, "rm -f /dev/shm/noise")
        subprocess.run(["umount", str(sdir)], check=True)
    assert client.create_snapshot_and_wait(source.id, "room-again", timeout=300).state.value == \
        "READY"


def test_snapshot_stands_alone_after_source_and_server_are_gone(client: Client,
                                                                tenki_server) -> None:
    s = client.create_and_wait(memory_mb=512, timeout=300)
    s.files.write("/root/keep.txt", "kept")
    snap = client.create_snapshot_and_wait(s.id, "standalone", timeout=300)
    s.terminate()
    tenki_server.stop()
    tenki_server.start()
    with tenki_server.client() as c:
        r = c.create_and_wait(snapshot_id=snap.id, timeout=120)
        assert r.files.read_text("/root/keep.txt") == "kept"
        r.terminate()
        c.delete_snapshot(snap.id)


def test_kill9_during_capture(tenki_server) -> None:
    with tenki_server.client() as c:
        s = c.create_and_wait(memory_mb=1024, timeout=300)
        _sh(s, COUNTER)
        _sh(s, "head -c 200M /dev/urandom > /dev/shm/noise")
        snap = c.create_snapshot(s.id, "interrupted")
        time.sleep(0.3)  # inside the pause or the compression
    tenki_server.kill9()
    tenki_server.start()
    with tenki_server.client() as c:
        got = c.get_snapshot(snap.id)
        assert got.state.value in ("FAILED", "READY"), got
        if got.state.value == "FAILED":
            assert got.state_reason
        again = c.get(s.id)
        assert again.state.value in ("READY", "RUNNING"), again.record
        first = int(_sh(again, "cat /tmp/count"))
        time.sleep(1.2)
        assert int(_sh(again, "cat /tmp/count")) > first  # not left paused
        # and the session can be snapshotted and restored again
        ok = c.create_snapshot_and_wait(s.id, "after-crash", timeout=300)
        r = c.create_and_wait(snapshot_id=ok.id, timeout=120)
        assert int(_sh(r, "cat /tmp/count")) > 0
        r.terminate()
        again.terminate()
