"""Volumes on the host against a fake QEMU and a fake guest agent: the hot-plug sequence
(``engine.hotplug``), mounting, the capture hooks, the flush before a stop and recovery
(``host.volumes``). The records are tests/unit/test_volume_control.py; the real thing is
tests/integration/test_volumes.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tenkibox import errors
from tenkibox.engine import hotplug
from tenkibox.engine.agent import AgentError
from tenkibox.engine.machine import MachineError
from tenkibox.host import volumes as hv
from tenkibox.host.api import MachineShape, VolumeMountSpec
from tenkibox.host.vm import VM, VMRecord

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
        self.fail: dict[str, MachineError] = {}  # command -> raised once
        self.running = True

    def commands(self) -> list[str]:
        return [c for c, _ in self.log if c not in ("query-pci", "query-named-block-nodes",
                                                     "qom-list")]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        args = args or {}
        self.log.append((cmd, args))
        if cmd in self.fail:
            raise self.fail.pop(cmd)
        if cmd == "query-pci":
            used = {port for port, _ in self.devices.values()}
            return [{"bus": 0, "devices": [
                {"qdev_id": "vda"},
                *({"qdev_id": f"hp{i}", "pci_bridge": {
                    "devices": [{"qdev_id": "x"}] if f"hp{i}" in used else []}}
                  for i in range(4))]}]
        if cmd == "qom-list":
            assert args == {"path": "/machine/peripheral"}
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
            if args.get("file") is not None:
                assert args["file"] in self.nodes
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
    hung: bool = False
    freeze_code: int = 0
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def _hang(self) -> None:
        if self.hung:
            await asyncio.sleep(3600)

    async def mount(self, serial: str, path: str, read_only: bool, mkfs: bool, *,
                    timeout: float | None = None) -> str:
        self.calls.append(("mount", serial, path, read_only, mkfs))
        if hotplug.device_id(serial) not in self.machine.devices:
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
        await self._hang()
        if path in self.busy:
            raise AgentError("umount failed: [Errno 16] Device or resource busy", errno="EBUSY")
        self.mounts.pop(path, None)

    async def exec(self, argv: list[str], **_: Any) -> Waitable:
        self.calls.append(("exec", *argv))
        return Waitable(self.freeze_code)

    async def sync(self, **_: Any) -> None:
        self.calls.append(("sync",))

    async def close(self) -> None:
        pass


class World:
    """One VM (its fake QEMU and agent) and a directory of volume files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vm, self.machine, self.agent = self.new_vm()

    def new_vm(self, machine: FakeMachine | None = None,
               agent: FakeAgent | None = None) -> tuple[VM, FakeMachine, FakeAgent]:
        """A VM object; given the machine and agent of an earlier one: the same VM found again
        after a server restart (nothing in memory)."""
        machine = machine or FakeMachine()
        agent = agent or FakeAgent(machine)
        shape = MachineShape(cpu=1, memory_mb=512, cmdline="", kernel="k" * 64,
                             initrd="i" * 64)
        record = VMRecord("ses_0000000000000001", shape, ["b" * 64])
        vm = VM(record, machine, agent, self.root / "disk")  # type: ignore[arg-type]
        return vm, machine, agent

    def file(self, volume_id: str) -> Path:
        return self.root / "volumes" / f"{volume_id}.img"

    @property
    def file_of(self) -> Callable[[str], Path]:
        return self.file

    def volume(self, n: int, size: int = 8 * MiB) -> str:
        vid = f"vol_{n:016d}"
        hv.make_sparse_file(self.file(vid), size)
        return vid

    async def attach(self, vid: str, path: str, read_only: bool = False) -> VolumeMountSpec:
        mount = VolumeMountSpec(vid, path, read_only)
        await hv.plug_and_mount(self.vm, self.file(vid), mount, mkfs=True)
        return mount


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# -- files ---------------------------------------------------------------------------------------


def test_volume_files_are_sparse_and_removed_idempotently(world: World) -> None:
    vid = world.volume(1, size=3 * MiB + 512)
    img = world.file(vid)
    assert img.stat().st_size == 3 * MiB + 512 and img.stat().st_blocks == 0
    assert img.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):  # never over another volume's file
        hv.make_sparse_file(img, MiB)
    hv.remove_file(img)
    assert not img.exists()
    hv.remove_file(img)


def test_journal_replay_detection(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    assert not hv.needs_journal_replay(img)
    assert not hv.needs_journal_replay(tmp_path / "missing.img")
    fd = os.open(img, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x53\xef", 1024 + 0x38)
        os.pwrite(fd, (0x2C2).to_bytes(4, "little"), 1024 + 0x60)  # clean
        assert not hv.needs_journal_replay(img)
        os.pwrite(fd, (0x2C6).to_bytes(4, "little"), 1024 + 0x60)  # RECOVER set
        assert hv.needs_journal_replay(img)
    finally:
        os.close(fd)


# -- plug and mount --------------------------------------------------------------------------------


async def test_plug_and_mount(world: World) -> None:
    vid = world.volume(1)
    mount = await world.attach(vid, "/data")
    assert world.machine.commands() == ["blockdev-add", "blockdev-add", "device_add"]
    fadd, dadd = [a for c, a in world.machine.log if c == "blockdev-add"]
    assert fadd["driver"] == "file" and fadd["filename"] == str(world.file(vid))
    assert dadd["driver"] == "raw" and dadd["file"] == fadd["node-name"]
    assert fadd["read-only"] is False and dadd["read-only"] is False
    add = dict(world.machine.log)["device_add"]
    assert add["serial"] == vid and add["bus"] == "hp0" and add["drive"] == dadd["node-name"]
    assert add["werror"] == "report" and add["rerror"] == "report"
    assert world.agent.mounts == {"/data": (vid, False)}
    assert world.agent.calls[-1] == ("mount", vid, "/data", False, True)  # formats a blank one
    assert world.vm.volumes == {vid: mount}
    other = world.volume(2)
    await world.attach(other, "/other")
    assert world.machine.devices[hotplug.device_id(other)][0] == "hp1"


async def test_read_only_uses_read_only_nodes(world: World) -> None:
    vid = world.volume(1)
    with pytest.raises(errors.ConflictError) as info:  # blank: nothing to mount read-only
        await world.attach(vid, "/ro", read_only=True)
    assert "read-write once" in info.value.message
    assert world.agent.calls[-1] == ("mount", vid, "/ro", True, False)  # never formatted
    assert world.machine.devices == {} and world.machine.nodes == {}
    assert world.vm.volumes == {}
    world.agent.formatted.add(vid)
    await world.attach(vid, "/ro", read_only=True)
    adds = [a for c, a in world.machine.log if c == "blockdev-add"]
    assert adds[-2]["read-only"] is True and adds[-1]["read-only"] is True
    assert world.vm.volumes[vid].read_only


async def test_at_most_four_ports(world: World) -> None:
    for i in range(4):
        await world.attach(world.volume(i), f"/{i}")
    fifth = world.volume(4)
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(fifth, "/4")
    assert "hot-plug" in info.value.message
    assert hotplug.file_node(fifth) not in world.machine.nodes
    assert fifth not in world.vm.volumes and "/4" not in world.agent.mounts


async def test_a_failed_mount_unplugs(world: World) -> None:
    vid = world.volume(1)
    world.agent.mounts["/busy"] = ("something-else", False)
    with pytest.raises(errors.ConflictError) as info:
        await world.attach(vid, "/busy")
    assert "already a mount point" in info.value.message
    assert world.machine.devices == {} and world.machine.nodes == {}
    assert world.vm.volumes == {}


async def test_an_unknown_agent_error_passes_through(world: World) -> None:
    vid = world.volume(1)

    async def broken(*_: Any, **__: Any) -> str:
        raise AgentError("mount failed: I/O error", errno="EIO")

    world.agent.mount = broken  # type: ignore[method-assign]
    with pytest.raises(AgentError) as info:
        await world.attach(vid, "/data")
    assert info.value.errno == "EIO" and info.value.__cause__ is None
    assert world.machine.devices == {} and world.machine.nodes == {}


async def test_a_missing_file_is_refused_before_any_qmp(world: World) -> None:
    with pytest.raises(errors.InternalError) as info:
        await world.attach("vol_0000000000000009", "/data")
    assert "vol_0000000000000009" in info.value.message
    assert world.machine.log == []


async def test_a_failed_device_add_drops_the_nodes(world: World) -> None:
    vid = world.volume(1)
    world.machine.fail["device_add"] = MachineError("QMP device_add failed: no")
    with pytest.raises(MachineError):
        await world.attach(vid, "/data")
    assert world.machine.nodes == {} and world.machine.devices == {}


async def test_plug_drops_nodes_a_cut_short_plug_left(world: World) -> None:
    vid = world.volume(1)
    world.machine.nodes = {hotplug.file_node(vid): None,
                           hotplug.disk_node(vid): hotplug.file_node(vid)}
    await world.attach(vid, "/data")
    assert world.agent.mounts == {"/data": (vid, False)}
    # and unplug drops nodes left without their device
    other = "vol_0000000000000002"
    world.machine.nodes[hotplug.file_node(other)] = None
    await hotplug.unplug(world.machine, other)  # type: ignore[arg-type]
    assert hotplug.file_node(other) not in world.machine.nodes


# -- unmount and unplug --------------------------------------------------------------------------


async def test_umount_then_unplug(world: World) -> None:
    vid = world.volume(1)
    mount = await world.attach(vid, "/data")
    world.machine.log.clear()
    await hv.umount_and_unplug(world.vm, mount)
    assert world.agent.calls[-1] == ("umount", "/data")
    cmds = world.machine.commands()
    # the device leaves, then its disk node is "in use" once more before it can go
    assert cmds == ["device_del", "blockdev-del", "blockdev-del", "blockdev-del"]
    assert world.machine.devices == {} and world.machine.nodes == {}
    assert world.vm.volumes == {} and world.agent.mounts == {}


async def test_umount_of_a_busy_volume_is_refused(world: World) -> None:
    vid = world.volume(1)
    mount = await world.attach(vid, "/data")
    world.agent.busy.add("/data")
    with pytest.raises(errors.ConflictError) as info:
        await hv.umount_and_unplug(world.vm, mount)
    assert "/data" in info.value.message and world.vm.session_id in info.value.message
    assert hotplug.device_id(vid) in world.machine.devices
    assert world.vm.volumes == {vid: mount}


async def test_a_guest_that_never_lets_go_times_out(world: World) -> None:
    vid = world.volume(1)
    await world.attach(vid, "/data")
    world.machine.execute = _no_device_del(world.machine)  # type: ignore[method-assign]
    with pytest.raises(errors.InternalError) as info:
        await hotplug.unplug(world.machine, vid, timeout=0.05)  # type: ignore[arg-type]
    assert "did not release" in info.value.message


def _no_device_del(machine: FakeMachine) -> Any:
    real = machine.execute

    async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
        if cmd == "device_del":
            machine.log.append((cmd, args or {}))
            return {}  # asked; the guest ignores it
        return await real(cmd, args)

    return execute


# -- captures -------------------------------------------------------------------------------------


async def test_capture_unplugs_and_replugs(world: World) -> None:
    a, b = world.volume(1), world.volume(2)
    mounts = [await world.attach(a, "/a"), await world.attach(b, "/a/b")]
    off = await hv.unplug_for_capture(world.vm, mounts, world.file_of)
    assert [x.path for x in off] == ["/a/b", "/a"]  # the inner mount first
    assert world.machine.devices == {} and world.machine.nodes == {}
    assert world.agent.mounts == {} and world.vm.volumes == {}
    assert await hv.replug(world.vm, off, world.file_of) == []
    assert world.agent.mounts == {"/a": (a, False), "/a/b": (b, False)}
    assert [c[2] for c in world.agent.calls if c[0] == "mount"][-2:] == ["/a", "/a/b"]
    assert all(not c[4] for c in world.agent.calls[-2:])  # never formatted again
    assert world.vm.volumes == {a: mounts[0], b: mounts[1]}


async def test_a_busy_volume_fails_the_capture_and_keeps_the_others(world: World) -> None:
    a, b = world.volume(1), world.volume(2)
    mounts = [await world.attach(a, "/a"), await world.attach(b, "/b")]
    world.agent.busy.add("/a")  # /b comes off first, then /a refuses
    with pytest.raises(errors.ConflictError) as info:
        await hv.unplug_for_capture(world.vm, mounts, world.file_of)
    assert a in info.value.message and "/a" in info.value.message
    assert "snapshot" in info.value.message
    assert world.agent.mounts == {"/a": (a, False), "/b": (b, False)}
    assert set(world.machine.devices) == {hotplug.device_id(a), hotplug.device_id(b)}
    assert set(world.vm.volumes) == {a, b}


async def test_a_volume_that_cannot_come_back_is_reported_lost(world: World) -> None:
    a, b = world.volume(1), world.volume(2)
    mounts = [await world.attach(a, "/a"), await world.attach(b, "/b")]
    off = await hv.unplug_for_capture(world.vm, mounts, world.file_of)
    world.file(a).unlink()
    assert await hv.replug(world.vm, off, world.file_of) == [a]
    assert world.agent.mounts == {"/b": (b, False)} and set(world.vm.volumes) == {b}
    assert hotplug.device_id(a) not in world.machine.devices
    assert hotplug.file_node(a) not in world.machine.nodes


# -- the end of a session ------------------------------------------------------------------------


async def test_flush_before_stop_unmounts_or_freezes(world: World) -> None:
    a, b = world.volume(1), world.volume(2)
    mounts = [await world.attach(a, "/a"), await world.attach(b, "/b")]
    world.agent.busy.add("/a")
    world.agent.calls.clear()
    await hv.flush_before_stop(world.vm, mounts)
    assert world.agent.calls == [("umount", "/b"), ("umount", "/a"),
                                 ("exec", "fsfreeze", "--freeze", "/a")]
    # a failed freeze falls back to a sync
    world.agent.freeze_code = 1
    world.agent.calls.clear()
    await hv.flush_before_stop(world.vm, [mounts[0]])
    assert world.agent.calls == [("umount", "/a"), ("exec", "fsfreeze", "--freeze", "/a"),
                                 ("sync",)]
    world.agent.calls.clear()
    await hv.flush_before_stop(world.vm, [])
    assert world.agent.calls == []


async def test_a_hung_guest_does_not_hold_the_stop(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mount = await world.attach(world.volume(1), "/a")
    monkeypatch.setattr(hv, "STOP_FLUSH_TIMEOUT_S", 0.05)
    world.agent.hung = True
    await asyncio.wait_for(hv.flush_before_stop(world.vm, [mount]), 5)


# -- recovery -----------------------------------------------------------------------------------


async def test_recover_mounts(world: World) -> None:
    kept, lost, half, gone, unmounted = (world.volume(i) for i in range(1, 6))
    m_kept = await world.attach(kept, "/kept")
    m_lost = await world.attach(lost, "/lost")
    m_unmounted = await world.attach(unmounted, "/unmounted")
    # a capture cut short: /lost was unplugged and never came back
    await hv.umount_and_unplug(world.vm, m_lost)
    # a detach cut short: unmounted, still plugged
    world.agent.mounts.pop("/unmounted")
    # an attach that was undone in the records but not in the VM
    await hotplug.plug(world.machine, half, world.file(half), False)  # type: ignore[arg-type]
    # a volume recorded as attached whose file is gone
    m_gone = VolumeMountSpec(gone, "/gone")
    world.file(gone).unlink()

    # the server restarts: a new VM object around the same QEMU and guest
    vm, _, _ = world.new_vm(world.machine, world.agent)
    before = len(world.agent.calls)
    lost_ids = await hv.recover_mounts(vm, [m_kept, m_lost, m_unmounted, m_gone],
                                       world.file_of)

    assert lost_ids == [gone]
    assert set(world.agent.mounts) == {"/kept", "/lost", "/unmounted"}
    assert vm.volumes == {kept: m_kept, lost: m_lost, unmounted: m_unmounted}
    assert hotplug.device_id(half) not in world.machine.devices
    assert hotplug.disk_node(half) not in world.machine.nodes
    assert hotplug.file_node(half) not in world.machine.nodes
    assert hotplug.device_id(gone) not in world.machine.devices
    # nothing was formatted on the way
    assert all(not c[4] for c in world.agent.calls[before:] if c[0] == "mount")
