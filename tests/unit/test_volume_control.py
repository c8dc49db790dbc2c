"""Volume records (``control.volumes.VolumeControl``) over a real SQLite store and a minimal fake
host: reservation, one session at a time, the checks of a session create, mount paths, session
ends and recovery. What the host does with a volume is tests/unit/test_host_volumes.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tenkibox import errors
from tenkibox.control.fleet import LOCAL, Fleet
from tenkibox.control.records import Records
from tenkibox.control.volumes import VolumeControl, mount_path
from tenkibox.host.api import VolumeMountSpec
from tenkibox.models import SessionCreate, VolumeAttach, VolumeCreate, VolumeMount
from tenkibox.store.db import Store, open_store
from tenkibox.store.tables import HostRow, SessionRow, VolumeRow, WorkspaceRow

MiB = 1 << 20


class Host:
    """The volume part of ``HostAPI``: files by volume id, VMs by session id, their mounts."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, VolumeMountSpec]] = {}  # session -> path -> mount
        self.files: dict[str, int] = {}  # volume id -> size
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}  # operation -> raised once

    def _enter(self, op: str, arg: Any) -> None:
        self.calls.append((op, arg))
        if op in self.fail:
            raise self.fail.pop(op)

    def calls_to(self, op: str) -> list[Any]:
        return [a for o, a in self.calls if o == op]

    def has_vm(self, session_id: str) -> bool:
        return session_id in self.vms

    async def create_volume(self, volume_id: str, size_bytes: int) -> None:
        self._enter("create_volume", volume_id)
        self.files[volume_id] = size_bytes

    async def delete_volume(self, volume_id: str) -> None:
        self._enter("delete_volume", volume_id)
        self.files.pop(volume_id, None)

    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        self._enter("attach_volume", (session_id, mount))
        assert mount.volume_id in self.files
        assert mount.path not in self.vms[session_id]
        self.vms[session_id][mount.path] = mount

    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        self._enter("detach_volume", (session_id, mount))
        self.vms[session_id].pop(mount.path)

    async def volume_files(self) -> list[str]:
        return sorted(self.files)


#: the workspace of every record here (admission reads its quotas: none)
WS = "ws_test"


class World:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.store: Store = open_store(home)
        self.records = Records(self.store)
        with self.store.tx() as orm:
            t = datetime.now(UTC)
            orm.add(WorkspaceRow(id=WS, name="test", quotas={}, created_at=t, updated_at=t))
            # the one member of the fleet, as a single-machine server records it
            orm.add(HostRow(id=LOCAL, state="ACTIVE", cpus=2, memory_total_mib=4096,
                            memory_reserve_mib=0, overcommit=1.0, disk_total_bytes=0,
                            disk_free_bytes=0, accelerator="tcg", qemu_version="",
                            cpu_model="", network_enforced=False, memory_used_mib=0,
                            tmpfs_used_bytes=0, tmpfs_total_bytes=0, registered_at=t))
        self.host = Host()
        self.fleet = Fleet({LOCAL: self.host})  # type: ignore[dict-item]
        self.fleet.bind(self.records)
        self.volumes = VolumeControl(self.records, self.fleet)
        self._sessions = 0

    async def session(self, state: str = "READY", vm: bool = True) -> str:
        self._sessions += 1
        sid = f"ses_{self._sessions:016d}"
        await self.records.insert(SessionRow(
            id=sid, workspace_id=WS, state=state, cpu=1, memory_mb=512, base_image_id="sandbox",
            env={}, meta={}, volumes=[], disk_chain=[], created_at=datetime.now(UTC)))
        if vm:
            self.host.vms[sid] = {}
        return sid

    async def volume(self, name: str = "v", size: int = 8 * MiB) -> str:
        return (await self.volumes.create(VolumeCreate(name=name, size_bytes=size), WS)).id

    async def attach(self, sid: str, vid: str, path: str, read_only: bool = False) -> None:
        await self.volumes.attach(sid, VolumeAttach(volume_id=vid, path=path,
                                                    read_only=read_only))

    def state(self, vid: str) -> str:
        return self.volumes.get(vid).state.value


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "home")
    yield w
    w.store.close()


# -- create and delete ---------------------------------------------------------------------------


async def test_create_and_delete(world: World) -> None:
    vol = await world.volumes.create(VolumeCreate(name=" data ", size_bytes=3 * MiB + 1), WS)
    assert vol.id.startswith("vol_") and vol.name == "data"
    assert vol.size_bytes == 3 * MiB + 512  # whole sectors
    assert (vol.state.value, vol.session_id, vol.path, vol.read_only) == (
        "AVAILABLE", None, None, False)
    assert world.host.files == {vol.id: vol.size_bytes}
    assert [v.id for v in world.volumes.query(WS)] == [vol.id]
    gone = await world.volumes.delete(vol.id)
    assert gone.state.value == "DELETED" and world.host.files == {}
    assert world.volumes.query(WS) == []
    assert world.state(vol.id) == "DELETED"
    assert world.store.get_volume(vol.id).deleted_at is not None  # type: ignore[union-attr]
    assert (await world.volumes.delete(vol.id)).state.value == "DELETED"
    assert world.host.calls_to("delete_volume") == [vol.id]
    with pytest.raises(errors.VolumeNotFoundError):
        world.volumes.get("vol_nothere")
    with pytest.raises(errors.VolumeNotFoundError):
        await world.volumes.delete("vol_nothere")


async def test_a_failed_create_leaves_nothing(world: World,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    world.host.fail["create_volume"] = errors.InternalError("disk full")
    with pytest.raises(errors.InternalError):
        await world.volume()
    assert world.volumes.query(WS) == [] and world.host.files == {}

    async def broken(row: Any, **_kw: Any) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(world.records, "insert", broken)
    with pytest.raises(RuntimeError):
        await world.volume()
    assert world.host.files == {}  # its file went with it
    assert world.host.calls_to("delete_volume") == world.host.calls_to("create_volume")[-1:]


async def test_empty_name_is_refused(world: World) -> None:
    with pytest.raises(errors.ValidationError) as info:
        await world.volumes.create(VolumeCreate(name="  ", size_bytes=MiB), WS)
    assert info.value.field == "name"
    assert world.host.calls == []


# -- mount paths and the checks of a session create ------------------------------------------------


@pytest.mark.parametrize(("path", "norm"), [("/data", "/data"), ("/data/", "/data"),
                                            ("//a//b/./c", "/a/b/c"), ("/usr/local", "/usr/local"),
                                            ("/devices", "/devices"), ("/run2", "/run2")])
def test_mount_paths(path: str, norm: str) -> None:
    assert mount_path(path) == norm


@pytest.mark.parametrize("path", ["data", "", "/", "//", "/a/../b", "/proc", "/sys/x",
                                  "/dev/shm", "/run", "/etc", "/usr", "/var/", "/a\0b"])
def test_bad_mount_paths(path: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        mount_path(path, "volumes.0.path")
    assert info.value.field == "volumes.0.path"


async def test_create_checks(world: World) -> None:
    a, b = await world.volume("a"), await world.volume("b")

    def check(req: SessionCreate) -> None:
        world.volumes.check_create(req, WS)

    def req(*mounts: tuple[str, str]) -> SessionCreate:
        return SessionCreate(volumes=[VolumeMount(volume_id=v, path=p) for v, p in mounts])

    check(req((a, "/a"), (b, "/b")))
    check(SessionCreate())
    with pytest.raises(errors.VolumeNotFoundError):
        check(req(("vol_nothere", "/a")))
    with pytest.raises(errors.VolumeNotFoundError):  # another workspace's: not found
        world.volumes.check_create(req((a, "/a")), "ws_other")
    with pytest.raises(errors.ValidationError) as info:
        check(req((a, "/x"), (b, "/x/")))
    assert info.value.field == "volumes" and "/x" in info.value.message
    with pytest.raises(errors.ValidationError) as info:
        check(req((a, "/x"), (a, "/y")))
    assert info.value.field == "volumes" and a in info.value.message
    with pytest.raises(errors.ValidationError) as info:
        check(req((a, "/etc")))
    assert info.value.field == "volumes.0.path"
    many = [await world.volume(str(i)) for i in range(5)]
    with pytest.raises(errors.ValidationError) as info:
        check(req(*((v, f"/m{i}") for i, v in enumerate(many))))
    assert info.value.field == "volumes"
    sid = await world.session()
    await world.attach(sid, a, "/a")
    with pytest.raises(errors.ConflictError) as cinfo:
        check(req((a, "/a")))
    assert sid in cinfo.value.message and "/a" in cinfo.value.message
    await world.volumes.delete(b)
    with pytest.raises(errors.VolumeNotFoundError):
        check(req((b, "/b")))
    assert world.host.calls_to("attach_volume") == [(sid, VolumeMountSpec(a, "/a"))]


# -- attach and detach ---------------------------------------------------------------------------


async def test_attach_reserves_plugs_and_records(world: World) -> None:
    vid = await world.volume()
    sid = await world.session()
    await world.attach(sid, vid, "/data/")
    assert world.host.calls_to("attach_volume") == [(sid, VolumeMountSpec(vid, "/data", False))]
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id, vol.path, vol.read_only) == (
        "IN_USE", sid, "/data", False)
    assert [(v.volume_id, v.path, v.read_only) for v in world.volumes.attachments(sid)] == [
        (vid, "/data", False)]
    assert world.volumes.mounts_of(sid) == [VolumeMountSpec(vid, "/data", False)]
    # idempotent for the same mount; refused elsewhere or on a used path
    await world.attach(sid, vid, "/data")
    assert len(world.host.calls_to("attach_volume")) == 1
    with pytest.raises(errors.ConflictError):
        await world.attach(sid, vid, "/other")
    with pytest.raises(errors.ConflictError):
        await world.attach(sid, vid, "/data", read_only=True)
    other = await world.volume()
    with pytest.raises(errors.ValidationError) as info:
        await world.attach(sid, other, "/data")
    assert info.value.field == "path"
    with pytest.raises(errors.ValidationError) as info:
        await world.attach(sid, other, "/proc/x")
    assert info.value.field == "path"
    assert world.state(other) == "AVAILABLE"
    with pytest.raises(errors.ConflictError) as cinfo:
        await world.volumes.delete(vid)
    assert sid in cinfo.value.message and "/data" in cinfo.value.message
    assert world.state(vid) == "IN_USE" and vid in world.host.files
    with pytest.raises(errors.VolumeNotFoundError):
        await world.attach(sid, "vol_nothere", "/x")


async def test_read_only(world: World) -> None:
    vid = await world.volume()
    sid = await world.session()
    # the host refuses (a blank volume has nothing to mount read-only): the reservation goes
    world.host.fail["attach_volume"] = errors.ConflictError(f"volume {vid} is blank")
    with pytest.raises(errors.ConflictError):
        await world.attach(sid, vid, "/ro", read_only=True)
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id, vol.path, vol.read_only) == (
        "AVAILABLE", None, None, False)
    await world.attach(sid, vid, "/ro", read_only=True)
    assert world.volumes.get(vid).read_only
    assert world.volumes.mounts_of(sid) == [VolumeMountSpec(vid, "/ro", True)]
    await world.attach(sid, vid, "/ro", read_only=True)  # the same mount: nothing to do


async def test_one_session_at_a_time(world: World) -> None:
    vid = await world.volume()
    s1, s2 = await world.session(), await world.session()
    await world.attach(s1, vid, "/d")
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(s2, vid, "/d")
    assert s1 in info.value.message
    assert [s for s, _ in world.host.calls_to("attach_volume")] == [s1]


async def test_the_reservation_is_compare_and_set(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Of two attaches that both saw the volume AVAILABLE, the second loses at the reservation,
    before its host plugs anything."""
    vid = await world.volume()
    s1, s2 = await world.session(), await world.session()
    stale = world.volumes.row(vid)
    await world.attach(s1, vid, "/d")
    monkeypatch.setattr(world.volumes, "usable", lambda _vid, _ws=None: stale)
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(s2, vid, "/d")
    assert s1 in info.value.message
    assert [s for s, _ in world.host.calls_to("attach_volume")] == [s1]
    assert world.volumes.get(vid).session_id == s1


async def test_a_failed_attach_frees_the_volume(world: World) -> None:
    vid = await world.volume()
    sid = await world.session()
    world.host.fail["attach_volume"] = errors.ConflictError("no free hot-plug slot")
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(sid, vid, "/d")
    assert "hot-plug" in info.value.message
    assert world.state(vid) == "AVAILABLE" and world.volumes.attachments(sid) == []
    # cancelled too (a terminate cancels what runs)
    world.host.fail["attach_volume"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        await world.attach(sid, vid, "/d")
    assert world.state(vid) == "AVAILABLE"
    await world.attach(sid, vid, "/d")
    assert world.state(vid) == "IN_USE"


async def test_detach(world: World) -> None:
    vid = await world.volume()
    sid = await world.session()
    await world.attach(sid, vid, "/data")
    await world.volumes.detach(sid, vid)
    assert world.host.calls_to("detach_volume") == [(sid, VolumeMountSpec(vid, "/data"))]
    assert world.volumes.attachments(sid) == []
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id, vol.path, vol.read_only) == (
        "AVAILABLE", None, None, False)
    with pytest.raises(errors.ConflictError):
        await world.volumes.detach(sid, vid)
    with pytest.raises(errors.VolumeNotFoundError):
        await world.volumes.detach(sid, "vol_nothere")


async def test_detach_of_a_busy_volume_is_refused(world: World) -> None:
    vid = await world.volume()
    sid = await world.session()
    await world.attach(sid, vid, "/data")
    world.host.fail["detach_volume"] = errors.ConflictError("/data is busy")
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.detach(sid, vid)
    assert "/data" in info.value.message
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id) == ("IN_USE", sid)


async def test_attach_and_detach_need_a_running_session(world: World) -> None:
    vid = await world.volume()
    creating = await world.session(state="CREATING")
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(creating, vid, "/d")
    assert "CREATING" in info.value.message
    no_vm = await world.session(vm=False)
    with pytest.raises(errors.ConflictError):
        await world.attach(no_vm, vid, "/d")
    with pytest.raises(errors.SessionNotFoundError):
        await world.attach("ses_nothere", vid, "/d")
    assert world.host.calls_to("attach_volume") == [] and world.state(vid) == "AVAILABLE"
    # the create-time attacher runs as soon as the VM exists, whatever the state says
    assert await world.volumes.attach_at_start(
        creating, [VolumeMount(volume_id=vid, path="/d")]) is None
    assert world.volumes.get(vid).session_id == creating
    with pytest.raises(errors.ConflictError):
        await world.volumes.detach(creating, vid)
    assert world.state(vid) == "IN_USE"


async def test_attach_at_start_reports_every_failure(world: World) -> None:
    good, taken = await world.volume(), await world.volume()
    sid, other = await world.session(), await world.session()
    await world.attach(other, taken, "/t")
    warning = await world.volumes.attach_at_start(sid, [
        VolumeMount(volume_id=taken, path="/t"), VolumeMount(volume_id="vol_nothere", path="/n"),
        VolumeMount(volume_id=good, path="/g")])
    assert warning is not None and taken in warning and "vol_nothere" in warning
    assert [v.volume_id for v in world.volumes.attachments(sid)] == [good]
    assert world.volumes.get(taken).session_id == other


async def test_mounts_come_parent_first(world: World) -> None:
    """A capture and a stop unmount in reverse order, so a mount inside another must come after
    it, whatever order the volumes were created in."""
    inner, outer, solo = await world.volume("inner"), await world.volume("outer"), \
        await world.volume("solo")
    sid = await world.session()
    await world.attach(sid, outer, "/a")
    await world.attach(sid, inner, "/a/b")
    await world.attach(sid, solo, "/0")
    paths = [m.path for m in world.volumes.mounts_of(sid)]
    assert paths.index("/a") < paths.index("/a/b")
    assert [a.path for a in world.volumes.attachments(sid)] == paths
    # a create attaches in that order too, whatever order its request gives
    other = await world.session(state="CREATING")
    await world.volumes.release_session(sid)
    world.host.calls.clear()
    assert await world.volumes.attach_at_start(other, [
        VolumeMount(volume_id=inner, path="/a/b/"), VolumeMount(volume_id=outer, path="/a/")]) \
        is None
    assert [m.path for _, m in world.host.calls_to("attach_volume")] == ["/a", "/a/b"]


# -- session ends and recovery --------------------------------------------------------------------


async def test_lost_volumes_are_released(world: World) -> None:
    """A volume the host could not plug back after a capture is detached in the records."""
    a, b = await world.volume("a"), await world.volume("b")
    sid, other = await world.session(), await world.session()
    await world.attach(sid, a, "/a")
    await world.attach(other, b, "/b")
    await world.volumes.lost(sid, [a, b])  # b is not this session's
    assert world.state(a) == "AVAILABLE"
    assert world.volumes.get(b).session_id == other


async def test_a_session_that_ended_frees_its_volumes(world: World) -> None:
    a, b, c = await world.volume("a"), await world.volume("b"), await world.volume("c")
    sid, other = await world.session(), await world.session()
    await world.attach(sid, a, "/a")
    await world.attach(sid, b, "/b")
    await world.attach(other, c, "/c")
    await world.volumes.release_session(sid)
    assert world.state(a) == world.state(b) == "AVAILABLE"
    assert world.volumes.attachments(sid) == []
    assert world.volumes.get(c).session_id == other
    await world.volumes.release_session(sid)  # again: nothing to do


async def test_recover(world: World) -> None:
    kept, dead, failed, orphan = [await world.volume(n)
                                  for n in ("kept", "dead", "failed", "orphan")]
    live = await world.session()
    await world.attach(live, kept, "/kept")
    # a session whose VM was not found again after the restart
    vm_gone = await world.session()
    await world.attach(vm_gone, dead, "/x")
    del world.host.vms[vm_gone]
    # a session that failed without its volumes being released
    was = await world.session()
    await world.attach(was, failed, "/f")
    await world.records.transition(SessionRow, was, "FAILED")
    # a session with no record at all
    await world.records.transition(VolumeRow, orphan, "IN_USE", session_id="ses_nothere",
                                   path="/o")
    # a deletion cut short, and a file no volume owns
    deleting = await world.volume("deleting")
    await world.records.transition(VolumeRow, deleting, "DELETING")
    world.host.files["vol_stray00000000000"] = MiB
    world.host.calls.clear()

    await world.volumes.recover()

    assert world.volumes.get(kept).session_id == live and world.state(kept) == "IN_USE"
    for vid in (dead, failed, orphan):
        assert world.state(vid) == "AVAILABLE" and world.volumes.get(vid).session_id is None
    assert world.state(deleting) == "DELETED"
    assert sorted(world.host.calls_to("delete_volume")) == sorted(
        [deleting, "vol_stray00000000000"])
    assert set(world.host.files) == {kept, dead, failed, orphan}
    assert world.host.calls_to("detach_volume") == []  # the host's recovery did the VMs
