"""The volume service against a fake QEMU and a fake guest agent: records, the hot-plug sequence,
the capture hooks, session ends and recovery. The real thing is tests/integration/test_volumes.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tenkibox import errors
from tenkibox.config import Layout
from tenkibox.engine.agent import AgentError
from tenkibox.engine.machine import MachineError
from tenkibox.models import SessionCreate, VolumeAttach, VolumeCreate, VolumeMount
from tenkibox.sessions.service import Runtime, SessionService
from tenkibox.store.db import open_store
from tenkibox.store.tables import SessionRow, VolumeRow
from tenkibox.volumes import service as vs
from tenkibox.volumes.service import VolumeService, mount_path, needs_journal_replay

MiB = 1 << 20


class FakeMachine:
    """Just enough QMP: four hot-plug ports, block nodes, devices that leave a poll after
    device_del and hold their node one blockdev-del longer (as QEMU does)."""

    def __init__(self) -> None:
        self.nodes: dict[str, str | None] = {}  # node -> child node
        self.devices: dict[str, tuple[str, str]] = {}  # id -> (port, drive)
        self.leaving: dict[str, int] = {}
        self.held: set[str] = set()
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.running = True

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        args = args or {}
        self.log.append((cmd, args))
        if cmd == "query-pci":
            used = {port for port, _ in self.devices.values()}
            return [{"bus": 0, "devices": [
                {"qdev_id": "vda"},
                *({"qdev_id": f"hp{i}", "pci_bridge": {
                    "devices": [{"qdev_id": "x"}] if f"hp{i}" in used else []}}
                  for i in range(4))]}]
        if cmd == "qom-list":
            for dev in list(self.leaving):
                self.leaving[dev] -= 1
                if self.leaving[dev] < 0:
                    del self.leaving[dev]
                    self.held.add(self.devices.pop(dev)[1])
            return [{"name": n} for n in [*(f"hp{i}" for i in range(4)), *self.devices]]
        if cmd == "query-named-block-nodes":
            return [{"node-name": n} for n in self.nodes]
        if cmd == "blockdev-add":
            name = args["node-name"]
            if name in self.nodes:
                raise MachineError(f"QMP blockdev-add failed: Duplicate node-name '{name}'")
            self.nodes[name] = args.get("file")
            return {}
        if cmd == "blockdev-del":
            name = args["node-name"]
            in_use = name in self.nodes.values() or any(
                d == name for _, d in self.devices.values())
            if in_use or name in self.held:
                self.held.discard(name)
                raise MachineError(f"QMP blockdev-del failed: Node {name} is in use")
            del self.nodes[name]
            return {}
        if cmd == "device_add":
            assert args["drive"] in self.nodes
            assert args["bus"] not in {p for p, _ in self.devices.values()}
            assert len(args["serial"]) <= 20
            self.devices[args["id"]] = (args["bus"], args["drive"])
            return {}
        if cmd == "device_del":
            if args["id"] not in self.devices:
                raise MachineError(f"QMP device_del failed: Device '{args['id']}' not found")
            self.leaving[args["id"]] = 1
            return {}
        raise AssertionError(f"unexpected QMP {cmd}")

    def alive(self) -> bool:
        return self.running

    async def quit(self, timeout: float = 5.0) -> None:
        self.running = False


@dataclass
class Waitable:
    code: int

    async def wait(self) -> int:
        return self.code


@dataclass
class FakeAgent:
    machine: FakeMachine
    mounts: dict[str, tuple[str, bool]] = field(default_factory=dict)
    formatted: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def mount(self, serial: str, path: str, read_only: bool, mkfs: bool, *,
                    timeout: float | None = None) -> str:
        self.calls.append(("mount", serial, path, read_only, mkfs))
        if f"dev-{serial}" not in self.machine.devices:
            raise AgentError(f"mount failed: no virtio disk with serial {serial!r}",
                             errno="ENODEV")
        if path in self.mounts:
            if self.mounts[path][0] == serial:
                return "/dev/vdb"
            raise AgentError(f"mount failed: {path} is already a mount point", errno="EBUSY")
        if serial not in self.formatted:
            if not mkfs or read_only:
                raise AgentError("mount failed: /dev/vdb has no filesystem", errno="EINVAL")
            self.formatted.add(serial)
        self.mounts[path] = (serial, read_only)
        return "/dev/vdb"

    async def umount(self, path: str, *, timeout: float | None = None) -> None:
        self.calls.append(("umount", path))
        if path in self.busy:
            raise AgentError("umount failed: [Errno 16] Device or resource busy", errno="EBUSY")
        self.mounts.pop(path, None)

    async def exec(self, argv: list[str], **_: Any) -> Waitable:
        self.calls.append(("exec", *argv))
        return Waitable(0)

    async def sync(self, **_: Any) -> None:
        self.calls.append(("sync",))

    async def close(self) -> None:
        pass


class World:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(home)
        self.store = open_store(home)
        self.sessions = SessionService(self.layout, self.store, "tcg")
        self.volumes = VolumeService(self.layout, self.store, self.sessions)

    def session(self, state: str = "READY") -> tuple[str, FakeMachine, FakeAgent]:
        sid = f"ses_{len(self.sessions.runtimes) + len(self.store.all(SessionRow)):016d}"
        self.store.add(SessionRow(id=sid, state=state, cpu=1, memory_mb=512,
                                  base_image_id="sandbox", env={}, meta={}, volumes=[],
                                  disk_chain=[], created_at=datetime.now(UTC)))
        machine = FakeMachine()
        agent = FakeAgent(machine)
        self.sessions.runtimes[sid] = Runtime(sid, machine, agent)  # type: ignore[arg-type]
        return sid, machine, agent

    async def volume(self, name: str = "v", size: int = 8 * MiB) -> str:
        return (await self.volumes.create(VolumeCreate(name=name, size_bytes=size))).id


@pytest.fixture
def world(tmp_path: Path) -> Any:
    w = World(tmp_path / "home")
    yield w
    w.store.close()


# -- records ---------------------------------------------------------------------------------


async def test_create_makes_a_sparse_file_and_delete_removes_it(world: World) -> None:
    vol = await world.volumes.create(VolumeCreate(name=" data ", size_bytes=3 * MiB + 1))
    assert vol.id.startswith("vol_") and vol.name == "data"
    assert vol.size_bytes == 3 * MiB + 512  # whole sectors
    img = world.layout.volumes / f"{vol.id}.img"
    assert img.stat().st_size == vol.size_bytes and img.stat().st_blocks == 0
    assert [v.id for v in world.volumes.query()] == [vol.id]
    gone = await world.volumes.delete(vol.id)
    assert gone.state.value == "DELETED" and not img.exists()
    assert world.volumes.query() == []
    assert world.volumes.get(vol.id).state.value == "DELETED"
    assert (await world.volumes.delete(vol.id)).state.value == "DELETED"
    with pytest.raises(errors.VolumeNotFoundError):
        world.volumes.get("vol_nothere")


async def test_empty_name_is_refused(world: World) -> None:
    with pytest.raises(errors.ValidationError) as info:
        await world.volumes.create(VolumeCreate(name="  ", size_bytes=MiB))
    assert info.value.field == "name"


@pytest.mark.parametrize(("path", "norm"), [("/data", "/data"), ("/data/", "/data"),
                                            ("//a//b/./c", "/a/b/c"), ("/usr/local", "/usr/local")])
def test_mount_paths(path: str, norm: str) -> None:
    assert mount_path(path) == norm


@pytest.mark.parametrize("path", ["data", "", "/", "/a/../b", "/proc", "/sys/x", "/dev/shm",
                                  "/etc", "/usr"])
def test_bad_mount_paths(path: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        mount_path(path, "volumes.0.path")
    assert info.value.field == "volumes.0.path"


async def test_create_checks(world: World) -> None:
    a, b = await world.volume("a"), await world.volume("b")
    check = world.volumes.check_create

    def req(*mounts: tuple[str, str]) -> SessionCreate:
        return SessionCreate(volumes=[VolumeMount(volume_id=v, path=p) for v, p in mounts])

    check(req((a, "/a"), (b, "/b")))
    with pytest.raises(errors.VolumeNotFoundError):
        check(req(("vol_nothere", "/a")))
    with pytest.raises(errors.ValidationError) as info:
        check(req((a, "/x"), (b, "/x/")))
    assert info.value.field == "volumes" and "/x" in info.value.message
    with pytest.raises(errors.ValidationError):
        check(req((a, "/x"), (a, "/y")))
    with pytest.raises(errors.ValidationError) as info:
        check(req((a, "/etc")))
    assert info.value.field == "volumes.0.path"
    many = [await world.volume(str(i)) for i in range(5)]
    with pytest.raises(errors.ValidationError):
        check(req(*((v, f"/m{i}") for i, v in enumerate(many))))
    sid, _, _ = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    with pytest.raises(errors.ConflictError) as cinfo:
        check(req((a, "/a")))
    assert sid in cinfo.value.message
    await world.volumes.delete(b)
    with pytest.raises(errors.VolumeNotFoundError):
        check(req((b, "/b")))
    # the hook is installed on this session service only
    assert world.sessions.volume_checks == [check]
    assert SessionService(world.layout, world.store, "tcg").volume_checks == []


# -- attach and detach ---------------------------------------------------------------------------


async def test_attach_plugs_mounts_and_records(world: World) -> None:
    vid = await world.volume()
    sid, machine, agent = world.session()
    session = await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/data/"))
    assert [(v.volume_id, v.path, v.read_only) for v in session.volumes] == [(vid, "/data", False)]
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id, vol.path) == ("IN_USE", sid, "/data")
    cmds = [c for c, _ in machine.log if c not in ("query-pci", "query-named-block-nodes")]
    assert cmds == ["blockdev-add", "blockdev-add", "device_add"]
    add = dict(machine.log)["device_add"]
    assert add["serial"] == vid and add["bus"] == "hp0" and add["werror"] == "report"
    assert agent.mounts == {"/data": (vid, False)}
    assert agent.calls[-1] == ("mount", vid, "/data", False, True)
    # idempotent for the same mount; refused elsewhere or on a used path
    await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/data"))
    with pytest.raises(errors.ConflictError):
        await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/other"))
    other = await world.volume()
    with pytest.raises(errors.ValidationError) as info:
        await world.volumes.attach(sid, VolumeAttach(volume_id=other, path="/data"))
    assert info.value.field == "path"
    with pytest.raises(errors.ConflictError) as cinfo:
        await world.volumes.delete(vid)
    assert sid in cinfo.value.message and "/data" in cinfo.value.message


async def test_read_only_uses_read_only_nodes(world: World) -> None:
    vid = await world.volume()
    sid, machine, agent = world.session()
    with pytest.raises(errors.ConflictError) as info:  # blank: nothing to mount read-only
        await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/ro", read_only=True))
    assert "read-write once" in info.value.message
    assert machine.devices == {} and machine.nodes == {}
    assert world.volumes.get(vid).state.value == "AVAILABLE"
    agent.formatted.add(vid)
    await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/ro", read_only=True))
    adds = [a for c, a in machine.log if c == "blockdev-add"]
    assert adds[-2]["read-only"] is True and adds[-1]["read-only"] is True
    assert world.volumes.get(vid).read_only


async def test_one_session_at_a_time(world: World) -> None:
    vid = await world.volume()
    s1, _, _ = world.session()
    s2, _, _ = world.session()
    await world.volumes.attach(s1, VolumeAttach(volume_id=vid, path="/d"))
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.attach(s2, VolumeAttach(volume_id=vid, path="/d"))
    assert s1 in info.value.message


async def test_at_most_four_ports(world: World) -> None:
    sid, _, _ = world.session()
    for i in range(4):
        await world.volumes.attach(sid, VolumeAttach(volume_id=await world.volume(), path=f"/{i}"))
    fifth = await world.volume()
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.attach(sid, VolumeAttach(volume_id=fifth, path="/4"))
    assert "hot-plug" in info.value.message
    assert world.volumes.get(fifth).state.value == "AVAILABLE"


async def test_a_failed_mount_unplugs_and_frees(world: World) -> None:
    vid = await world.volume()
    sid, machine, agent = world.session()
    agent.mounts["/busy"] = ("something-else", False)
    with pytest.raises(errors.ConflictError):
        await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/busy"))
    assert machine.devices == {} and machine.nodes == {}
    assert world.volumes.get(vid).state.value == "AVAILABLE"
    assert world.sessions.get(sid).volumes == []


async def test_detach_unmounts_then_unplugs(world: World) -> None:
    vid = await world.volume()
    sid, machine, agent = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/data"))
    machine.log.clear()
    session = await world.volumes.detach(sid, vid)
    assert session.volumes == []
    assert agent.calls[-1] == ("umount", "/data")
    cmds = [c for c, _ in machine.log]
    assert cmds.index("device_del") < cmds.index("blockdev-del")
    assert machine.devices == {} and machine.nodes == {}
    vol = world.volumes.get(vid)
    assert (vol.state.value, vol.session_id, vol.path) == ("AVAILABLE", None, None)
    with pytest.raises(errors.ConflictError):
        await world.volumes.detach(sid, vid)


async def test_detach_of_a_busy_volume_is_refused(world: World) -> None:
    vid = await world.volume()
    sid, machine, agent = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/data"))
    agent.busy.add("/data")
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.detach(sid, vid)
    assert "/data" in info.value.message
    assert f"dev-{vid}" in machine.devices
    assert world.volumes.get(vid).state.value == "IN_USE"


async def test_attach_needs_a_running_session(world: World) -> None:
    vid = await world.volume()
    sid, _, _ = world.session(state="CREATING")
    with pytest.raises(errors.ConflictError):
        await world.volumes.attach(sid, VolumeAttach(volume_id=vid, path="/d"))
    with pytest.raises(errors.SessionNotFoundError):
        await world.volumes.attach("ses_nothere", VolumeAttach(volume_id=vid, path="/d"))
    # the create-time attacher runs as soon as the VM exists, whatever the state says
    await world.volumes.attach_at_start(sid, SessionCreate(
        volumes=[VolumeMount(volume_id=vid, path="/d")]))
    assert world.volumes.get(vid).session_id == sid


async def test_attach_at_start_reports_every_failure(world: World) -> None:
    good, taken = await world.volume(), await world.volume()
    sid, _, _ = world.session()
    other, _, _ = world.session()
    await world.volumes.attach(other, VolumeAttach(volume_id=taken, path="/t"))
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.attach_at_start(sid, SessionCreate(volumes=[
            VolumeMount(volume_id=taken, path="/t"), VolumeMount(volume_id=good, path="/g")]))
    assert taken in info.value.message
    assert [v.volume_id for v in world.sessions.get(sid).volumes] == [good]


# -- snapshots -----------------------------------------------------------------------------------


async def test_capture_unplugs_and_replugs(world: World) -> None:
    a, b = await world.volume("a"), await world.volume("b")
    sid, machine, agent = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    await world.volumes.attach(sid, VolumeAttach(volume_id=b, path="/a/b"))
    rt = world.sessions.runtimes[sid]
    off = await world.volumes.unplug_for_capture(rt)
    assert [x.path for x in off] == ["/a/b", "/a"]  # the inner mount first
    assert machine.devices == {} and machine.nodes == {} and agent.mounts == {}
    # the records do not change for the instant of the capture
    assert len(world.sessions.get(sid).volumes) == 2
    await world.volumes.replug_after_capture(rt, off)
    assert agent.mounts == {"/a": (a, False), "/a/b": (b, False)}
    assert [c[2] for c in agent.calls if c[0] == "mount"][-2:] == ["/a", "/a/b"]
    assert all(not c[4] for c in agent.calls[-2:])  # never formatted again


async def test_a_busy_volume_fails_the_capture_and_keeps_the_others(world: World) -> None:
    a, b = await world.volume("a"), await world.volume("b")
    sid, machine, agent = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    await world.volumes.attach(sid, VolumeAttach(volume_id=b, path="/b"))
    agent.busy.add("/a")  # /b comes off first, then /a refuses
    with pytest.raises(errors.ConflictError) as info:
        await world.volumes.unplug_for_capture(world.sessions.runtimes[sid])
    assert a in info.value.message and "/a" in info.value.message
    assert agent.mounts == {"/a": (a, False), "/b": (b, False)}
    assert set(machine.devices) == {f"dev-{a}", f"dev-{b}"}


async def test_a_volume_that_cannot_come_back_is_detached_in_the_records(world: World) -> None:
    a = await world.volume("a")
    sid, _, _ = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    rt = world.sessions.runtimes[sid]
    off = await world.volumes.unplug_for_capture(rt)
    world.volumes.file(a).unlink()
    await world.volumes.replug_after_capture(rt, off)
    assert world.sessions.get(sid).volumes == []
    assert world.volumes.get(a).state.value == "AVAILABLE"


# -- session ends and recovery --------------------------------------------------------------------


async def test_terminate_unmounts_before_the_vm_stops(world: World) -> None:
    a, b = await world.volume("a"), await world.volume("b")
    sid, machine, agent = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    await world.volumes.attach(sid, VolumeAttach(volume_id=b, path="/b"))
    agent.busy.add("/a")
    agent.calls.clear()
    session = await world.sessions.terminate(sid)
    assert session.state.value == "TERMINATED" and session.volumes == []
    assert agent.calls == [("umount", "/b"), ("umount", "/a"),
                           ("exec", "fsfreeze", "--freeze", "/a")]
    assert not machine.running
    for vid in (a, b):
        assert world.volumes.get(vid).state.value == "AVAILABLE"


async def test_a_session_that_died_frees_its_volumes(world: World) -> None:
    a = await world.volume()
    sid, _, _ = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=a, path="/a"))
    # the VM died on its own: FAILED without the session-gone hook
    world.store.update(SessionRow, sid, state="FAILED")
    world.sessions.runtimes.pop(sid)
    assert world.volumes.get(a).state.value == "AVAILABLE"
    assert world.sessions.get(sid).volumes == []


async def test_recover(world: World) -> None:
    kept, lost, half, doomed = [await world.volume(n) for n in ("kept", "lost", "half", "doomed")]
    sid, machine, agent = world.session()
    gone, _, _ = world.session()
    await world.volumes.attach(sid, VolumeAttach(volume_id=kept, path="/kept"))
    await world.volumes.attach(sid, VolumeAttach(volume_id=lost, path="/lost"))
    # a capture cut short: /lost was unplugged and never came back
    rt = world.sessions.runtimes[sid]
    await world.volumes._umount_and_unplug(rt, world.sessions.get(sid).volumes[1])
    # an attach cut short: reserved and plugged, not recorded
    world.store.update(VolumeRow, half, state="IN_USE", session_id=sid, path="/half")
    await vs.plug(machine, half, world.volumes.file(half), False)  # type: ignore[arg-type]
    # a volume reserved by a session that is not running any more
    world.store.update(VolumeRow, doomed, state="IN_USE", session_id=gone, path="/x")
    world.sessions.runtimes.pop(gone)
    # a deletion cut short, and a file nobody owns
    dele = await world.volume("deleting")
    world.store.update(VolumeRow, dele, state="DELETING")
    stray = world.layout.volumes / "vol_stray00000000000.img"
    stray.write_bytes(b"")

    await world.volumes.recover()

    assert {v.path for v in world.sessions.get(sid).volumes} == {"/kept", "/lost"}
    assert set(agent.mounts) == {"/kept", "/lost"}
    assert f"dev-{half}" not in machine.devices and "vd-" + half not in machine.nodes
    assert world.volumes.get(half).state.value == "AVAILABLE"
    assert world.volumes.get(doomed).state.value == "AVAILABLE"
    assert world.volumes.get(dele).state.value == "DELETED"
    assert not world.volumes.file(dele).exists() and not stray.exists()
    assert world.volumes.file(kept).exists()


def test_journal_replay_detection(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    assert not needs_journal_replay(img)
    fd = os.open(img, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x53\xef", 1024 + 0x38)
        os.pwrite(fd, (0x2C2).to_bytes(4, "little"), 1024 + 0x60)  # clean
        assert not needs_journal_replay(img)
        os.pwrite(fd, (0x2C6).to_bytes(4, "little"), 1024 + 0x60)  # RECOVER set
        assert needs_journal_replay(img)
    finally:
        os.close(fd)
