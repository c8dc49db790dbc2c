"""Volumes on real VMs (TCG), through the SDK against a test server.

One booted session (``box``, volume A at /data) carries most of the module, in order; the
other VMs are restores of its snapshot (~3 s each instead of a boot). The order matters: the
snapshot is taken after the live attach/detach tests, ``box`` is terminated by the durability
test, and the server restart test runs last but one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.server import AUTH

from tenkibox import errors

pytestmark = pytest.mark.integration

MEMORY_MB = 1024
MARKER = "written-before-the-snapshot"


# -- helpers ---------------------------------------------------------------------------------


def sh(session: Any, command: str) -> Any:
    return session.exec("/bin/sh", "-c", command)


def ok(session: Any, command: str) -> str:
    res = sh(session, command)
    assert res.exit_code == 0, f"{command!r} exited {res.exit_code}: {res.stderr}"
    return str(res.stdout)


def wait_volumes(client: Any, session_id: str, count: int, timeout: float = 120.0) -> Any:
    """Create-time volumes are attached once the VM runs; wait until the record shows them."""
    deadline = time.monotonic() + timeout
    while True:
        session = client.get(session_id)
        record = session.record
        if len(record.volumes) >= count:
            return session
        assert not record.state_reason, record.state_reason
        assert time.monotonic() < deadline, f"volumes not attached: {record}"
        time.sleep(0.1)


def mounts(session: Any) -> dict[str, str]:
    """Guest mount point -> options, for the virtio disks other than the system disk."""
    out = {}
    for line in ok(session, "cat /proc/self/mounts").splitlines():
        dev, target, _fs, opts = line.split()[:4]
        if dev.startswith("/dev/vd") and dev != "/dev/vda":
            out[target] = opts
    return out


def raw_error(resp: httpx.Response) -> errors.TenkiError:
    return errors.error_from_body(resp.status_code, resp.json())


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vol_a(client: Any) -> Any:
    return client.create_volume("alpha", "64MiB")


@pytest.fixture(scope="module")
def vol_b(client: Any) -> Any:
    return client.create_volume("beta", "32MiB")


def terminate_all(server: Any, session_ids: list[str]) -> None:
    # a fresh client: the server may have been restarted on another port since
    fresh = server.client()
    try:
        for session_id in session_ids:
            fresh.terminate(session_id)
    finally:
        fresh.close()


@pytest.fixture(scope="module")
def box(tenki_server: Any, client: Any, vol_a: Any) -> Iterator[Any]:
    t0 = time.monotonic()
    session = client.create_and_wait(memory_mb=MEMORY_MB, volumes=[f"{vol_a.id}:/data"])
    try:
        session = wait_volumes(client, session.id, 1)
        print(f"boot with a volume: {time.monotonic() - t0:.2f}s")
        yield session
    finally:
        terminate_all(tenki_server, [session.id])


@pytest.fixture(scope="module")
def restores(tenki_server: Any) -> Iterator[list[str]]:
    """Ids of the sessions restored by the tests; terminated at the end whatever happened."""
    made: list[str] = []
    yield made
    terminate_all(tenki_server, made)


# -- records, no VM ----------------------------------------------------------------------------


def test_create_get_list(tenki_server: Any, client: Any, vol_a: Any) -> None:
    assert vol_a.id.startswith("vol_")
    assert vol_a.name == "alpha"
    assert vol_a.size_bytes == 64 << 20
    assert vol_a.state.value == "AVAILABLE"
    assert vol_a.session_id is None and vol_a.path is None
    assert client.get_volume(vol_a.id) == vol_a
    assert vol_a.id in {v.id for v in client.list_volumes()}
    # a sparse file the server owns: its size, nothing allocated yet
    img = Path(tenki_server.home) / "host" / "volumes" / f"{vol_a.id}.img"
    assert img.stat().st_size == 64 << 20
    assert img.stat().st_blocks == 0


def test_sizes_out_of_range(tenki_server: Any, client: Any) -> None:
    for size in ("512KiB", "101GiB", 0):
        with pytest.raises(errors.ValidationError) as info:
            client.create_volume("x", size)
        assert info.value.field == "size_bytes", info.value
    # the server refuses them too, naming the field
    for size in ((1 << 20) - 1, (100 << 30) + 1):
        resp = httpx.post(f"{tenki_server.url}/v1/volumes",
                          json={"name": "x", "size_bytes": size}, headers=AUTH)
        err = raw_error(resp)
        assert resp.status_code == 422 and isinstance(err, errors.ValidationError)
        assert err.field == "size_bytes"
    # the limits themselves are fine
    small = client.create_volume("small", "1MiB")
    assert small.size_bytes == 1 << 20
    assert client.delete_volume(small.id).state.value == "DELETED"


def test_create_refuses_bad_volumes_before_booting(tenki_server: Any, client: Any,
                                                   vol_a: Any, vol_b: Any) -> None:
    before = len(client.list())
    with pytest.raises(errors.VolumeNotFoundError):
        client.create(volumes=["vol_doesnotexist0000:/data"])
    with pytest.raises(errors.ValidationError):
        client.create(volumes=[f"{vol_a.id}:data"])
    with pytest.raises(errors.ValidationError) as info:
        client.create(volumes=[f"{vol_a.id}:/data", f"{vol_b.id}:/data/"])
    assert info.value.field == "volumes"
    with pytest.raises(errors.ValidationError):
        client.create(volumes=[f"{vol_a.id}:/one", f"{vol_a.id}:/two"])
    # the server's own check of a relative path (the SDK refuses it before sending)
    resp = httpx.post(f"{tenki_server.url}/v1/sessions",
                      json={"volumes": [{"volume_id": vol_a.id, "path": "data"}]}, headers=AUTH)
    err = raw_error(resp)
    assert isinstance(err, errors.ValidationError) and "absolute" in err.message
    assert (err.field or "").startswith("volumes.0")
    assert len(client.list()) == before, "a refused create must not leave a session"


# -- one booted session ----------------------------------------------------------------------------


def test_attached_at_create(client: Any, box: Any, vol_a: Any) -> None:
    assert [(v.volume_id, v.path, v.read_only) for v in box.record.volumes] == [
        (vol_a.id, "/data", False)]
    vol = client.get_volume(vol_a.id)
    assert (vol.state.value, vol.session_id, vol.path) == ("IN_USE", box.id, "/data")
    assert mounts(box)["/data"].startswith("rw")
    ok(box, f"echo {MARKER} > /data/marker && echo root-side > /root/marker")


def test_a_volume_in_use_is_refused(client: Any, box: Any, vol_a: Any) -> None:
    with pytest.raises(errors.ConflictError) as info:
        client.create(volumes=[f"{vol_a.id}:/elsewhere"])
    assert box.id in str(info.value)
    with pytest.raises(errors.ConflictError) as info:
        client.delete_volume(vol_a.id)
    assert box.id in str(info.value)
    assert client.get_volume(vol_a.id).state.value == "IN_USE"


def test_attach_and_detach_on_a_live_session(client: Any, box: Any, vol_b: Any) -> None:
    t0 = time.monotonic()
    box.attach_volume(vol_b.id, "/b")
    attach_s = time.monotonic() - t0
    assert {v.volume_id: v.path for v in client.get(box.id).record.volumes}[vol_b.id] == "/b"
    assert client.get_volume(vol_b.id).state.value == "IN_USE"
    ok(box, "echo hot-plugged > /b/file")
    t0 = time.monotonic()
    box.detach_volume(vol_b.id)
    detach_s = time.monotonic() - t0
    print(f"attach (with mkfs) {attach_s:.2f}s, detach {detach_s:.2f}s")
    assert vol_b.id not in {v.volume_id for v in client.get(box.id).record.volumes}
    vol = client.get_volume(vol_b.id)
    assert (vol.state.value, vol.session_id, vol.path) == ("AVAILABLE", None, None)
    assert "/b" not in mounts(box)
    assert ok(box, "ls /sys/block").split() == ["vda", "vdb"]  # only the system disk and A
    # again, now formatted: the data is there
    t0 = time.monotonic()
    box.attach_volume(vol_b.id, "/b2")
    print(f"attach (formatted) {time.monotonic() - t0:.2f}s")
    assert ok(box, "cat /b2/file").strip() == "hot-plugged"
    box.detach_volume(vol_b.id)


def test_read_only_is_enforced_by_the_guest_kernel(client: Any, box: Any, vol_b: Any) -> None:
    box.attach_volume(vol_b.id, "/ro", read_only=True)
    try:
        assert client.get_volume(vol_b.id).read_only
        assert mounts(box)["/ro"].startswith("ro")
        assert ok(box, "cat /ro/file").strip() == "hot-plugged"
        res = sh(box, "echo nope > /ro/new")
        assert res.exit_code != 0 and "Read-only file system" in res.stderr
        # not a mount option that root could lift: the disk itself is read-only
        res = sh(box, "mount -o remount,rw /ro")
        assert res.exit_code != 0, res.stdout
        disk = ok(box, "awk '$2 == \"/ro\" {print $1}' /proc/self/mounts").strip()
        assert ok(box, f"cat /sys/block/{Path(disk).name}/ro").strip() == "1"
    finally:
        box.detach_volume(vol_b.id)


def test_bad_live_attach(tenki_server: Any, client: Any, box: Any, vol_a: Any,
                         vol_b: Any) -> None:
    with pytest.raises(errors.VolumeNotFoundError):
        box.attach_volume("vol_doesnotexist0000", "/x")
    with pytest.raises(errors.ValidationError):
        box.attach_volume(vol_b.id, "relative")
    resp = httpx.post(f"{tenki_server.url}/v1/sessions/{box.id}/volumes",
                      json={"volume_id": vol_b.id, "path": "relative"}, headers=AUTH)
    err = raw_error(resp)
    assert isinstance(err, errors.ValidationError) and "absolute" in err.message
    with pytest.raises(errors.ValidationError) as info:
        box.attach_volume(vol_b.id, "/data")  # A is mounted there
    assert info.value.field == "path"
    with pytest.raises(errors.ValidationError):
        box.attach_volume(vol_b.id, "/etc")
    with pytest.raises(errors.ConflictError):
        box.detach_volume(vol_b.id)  # not attached
    assert client.get_volume(vol_b.id).state.value == "AVAILABLE"


def test_snapshot_fails_while_a_volume_is_busy(client: Any, box: Any, vol_a: Any) -> None:
    proc = box.start("/bin/sh", "-c", "cd /data && exec sleep 300")
    try:
        time.sleep(0.5)
        with pytest.raises(errors.SnapshotFailedError) as info:
            box.snapshot()
        assert vol_a.id in str(info.value) and "/data" in str(info.value)
    finally:
        proc.kill()
        proc.wait()
    # the session goes on, its volume still mounted
    assert client.get(box.id).state.value in ("READY", "RUNNING")
    assert "/data" in mounts(box)
    assert ok(box, "cat /data/marker").strip() == MARKER


@pytest.fixture(scope="module")
def snap(client: Any, box: Any, vol_a: Any) -> Any:
    t0 = time.monotonic()
    snapshot = box.snapshot()
    print(f"snapshot with one volume: {time.monotonic() - t0:.2f}s")
    return snapshot


def test_snapshot_holds_no_volume_data(client: Any, box: Any, snap: Any, vol_a: Any,
                                       restores: list[str]) -> None:
    assert snap.state.value == "READY"
    # the source got its volume back, mounted where it was
    assert mounts(box)["/data"].startswith("rw")
    assert ok(box, "cat /data/marker").strip() == MARKER
    assert [v.volume_id for v in client.get(box.id).record.volumes] == [vol_a.id]
    # a restore attaches nothing: no disk, no mount, no data; the rest of the guest is there
    restored = client.create_and_wait(snapshot_id=snap.id)
    restores.append(restored.id)
    assert restored.record.volumes == []
    assert mounts(restored) == {}
    assert ok(restored, "ls /sys/block").split() == ["vda"]
    assert ok(restored, "ls -A /data").strip() == ""
    assert ok(restored, "cat /root/marker").strip() == "root-side"
    # and it works: the root disk takes writes
    ok(restored, "echo fine > /root/after-restore && sync")
    # the volume is still the source's
    with pytest.raises(errors.ConflictError):
        restored.attach_volume(vol_a.id, "/data")
    with pytest.raises(errors.ConflictError):
        client.delete_volume(vol_a.id)


def test_data_survives_the_session_and_comes_back_after_a_restore(
        client: Any, box: Any, snap: Any, vol_a: Any, vol_b: Any,
        restores: list[str]) -> None:
    # written just before the stop: still in the guest's page cache unless tenki flushes it
    ok(box, "head -c 3000000 /dev/urandom > /data/late && md5sum < /data/late > /root/late.md5")
    digest = ok(box, "cat /root/late.md5").split()[0]
    client.terminate(box.id)
    vol = client.get_volume(vol_a.id)
    assert (vol.state.value, vol.session_id, vol.path) == ("AVAILABLE", None, None)
    assert client.get(box.id).record.volumes == []

    t0 = time.monotonic()
    restored = client.create_and_wait(snapshot_id=snap.id,
                                      volumes=[f"{vol_a.id}:/data", f"{vol_b.id}:/ro:ro"])
    restores.append(restored.id)
    restored = wait_volumes(client, restored.id, 2)
    print(f"restore + 2 volumes: {time.monotonic() - t0:.2f}s")
    assert {(v.volume_id, v.path, v.read_only) for v in restored.record.volumes} == {
        (vol_a.id, "/data", False), (vol_b.id, "/ro", True)}
    assert ok(restored, "cat /data/marker").strip() == MARKER
    assert ok(restored, "md5sum < /data/late").split()[0] == digest
    assert ok(restored, "cat /ro/file").strip() == "hot-plugged"
    assert mounts(restored)["/ro"].startswith("ro")
    assert client.get_volume(vol_b.id).session_id == restored.id


def test_attachments_survive_a_server_restart(tenki_server: Any, vol_a: Any, vol_b: Any,
                                              restores: list[str]) -> None:
    session_id = restores[-1]
    tenki_server.kill9()
    tenki_server.start()
    fresh = tenki_server.client()
    try:
        session = fresh.get(session_id)
        assert len(session.record.volumes) == 2
        assert fresh.get_volume(vol_a.id).session_id == session_id
        assert set(mounts(session)) == {"/data", "/ro"}
        session.detach_volume(vol_b.id)
        assert fresh.get_volume(vol_b.id).state.value == "AVAILABLE"
        assert ok(session, "cat /data/marker").strip() == MARKER
        session.terminate()
        assert fresh.get_volume(vol_a.id).state.value == "AVAILABLE"
    finally:
        fresh.close()


def test_delete_frees_the_space(tenki_server: Any, vol_a: Any, vol_b: Any) -> None:
    fresh = tenki_server.client()
    try:
        home = Path(tenki_server.home) / "host" / "volumes"
        img = home / f"{vol_a.id}.img"
        assert img.stat().st_blocks > 0  # the data written above
        for vol in (vol_a, vol_b):
            gone = fresh.delete_volume(vol.id)
            assert gone.state.value == "DELETED"
            assert not (home / f"{vol.id}.img").exists()
            assert fresh.delete_volume(vol.id).state.value == "DELETED"  # idempotent
        assert {vol_a.id, vol_b.id}.isdisjoint(v.id for v in fresh.list_volumes())
        with pytest.raises(errors.VolumeNotFoundError):
            fresh.create(volumes=[f"{vol_a.id}:/data"])
    finally:
        fresh.close()
