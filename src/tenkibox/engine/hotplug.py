"""Hot-plugging a raw disk file into a running VM (QMP only).

``blockdev-add`` file + raw nodes, then ``device_add virtio-blk-pci`` on a free
``pcie-root-port`` (created at launch) with ``serial=<volume id>``, so the guest finds the disk
by its serial. A read-only attachment uses read-only block nodes: the guest sees a read-only
disk. Unplugging waits until QEMU has really dropped the device (the guest must acknowledge the
eject) and only then deletes the block nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from ..errors import ConflictError, InternalError, TenkiError
from .machine import Machine, MachineError

# The guest must acknowledge the eject before QEMU drops the device; it takes ~0.1 s.
UNPLUG_TIMEOUT_S = 15.0
UNPLUG_POLL_S = 0.02


def device_id(volume_id: str) -> str:
    return f"dev-{volume_id}"


def file_node(volume_id: str) -> str:
    return f"vf-{volume_id}"


def disk_node(volume_id: str) -> str:
    return f"vd-{volume_id}"


async def peripherals(machine: Machine) -> set[str]:
    return {item["name"] for item in await machine.execute(
        "qom-list", {"path": "/machine/peripheral"})}


async def block_nodes(machine: Machine) -> set[str]:
    return {n["node-name"] for n in await machine.execute(
        "query-named-block-nodes", {"flat": True})}


async def free_port(machine: Machine) -> str:
    """A hot-plug port (``hpN``, created at launch) with nothing plugged into it."""
    ports: dict[str, bool] = {}
    for bus in await machine.execute("query-pci"):
        for dev in bus.get("devices", []):
            name, bridge = dev.get("qdev_id") or "", dev.get("pci_bridge")
            if name.startswith("hp") and bridge is not None:
                ports[name] = bool(bridge.get("devices"))
    for name in sorted(ports):
        if not ports[name]:
            return name
    raise ConflictError(f"no free hot-plug slot: a session takes at most {len(ports)} volumes")


async def plug(machine: Machine, volume_id: str, file: Path, read_only: bool) -> None:
    port = await free_port(machine)
    opts: dict[str, Any] = {"read-only": read_only, "discard": "unmap"}
    fnode, dnode = file_node(volume_id), disk_node(volume_id)
    await drop_nodes(machine, volume_id)  # left by a hot-plug cut short
    await machine.execute("blockdev-add", {"driver": "file", "node-name": fnode,
                                           "filename": str(file), **opts})
    try:
        await machine.execute("blockdev-add", {"driver": "raw", "node-name": dnode,
                                               "file": fnode, **opts})
        # werror=report: a full host disk must fail the guest's write, not pause the whole VM.
        await machine.execute("device_add", {
            "driver": "virtio-blk-pci", "id": device_id(volume_id), "drive": dnode,
            "bus": port, "serial": volume_id, "werror": "report", "rerror": "report"})
    except BaseException:
        with contextlib.suppress(TenkiError):
            await drop_nodes(machine, volume_id)
        raise


async def unplug(machine: Machine, volume_id: str, timeout: float = UNPLUG_TIMEOUT_S) -> None:
    dev = device_id(volume_id)
    if dev in await peripherals(machine):
        try:
            await machine.execute("device_del", {"id": dev})
        except MachineError as exc:
            if "not found" not in exc.message.lower():
                raise
        # device_del only asks the guest; the block nodes stay busy until it has let go.
        deadline = time.monotonic() + timeout
        while dev in await peripherals(machine):
            if time.monotonic() > deadline:
                raise InternalError(f"the guest did not release volume {volume_id} within "
                                    f"{timeout:g}s")
            await asyncio.sleep(UNPLUG_POLL_S)
    await drop_nodes(machine, volume_id, deadline=time.monotonic() + timeout)


async def drop_nodes(machine: Machine, volume_id: str, deadline: float = 0.0) -> None:
    nodes = await block_nodes(machine)
    for node in (disk_node(volume_id), file_node(volume_id)):
        if node not in nodes:
            continue
        while True:
            try:
                await machine.execute("blockdev-del", {"node-name": node})
                break
            except MachineError as exc:
                # The device leaves the QOM tree before it is finalized and lets go of its
                # block backend: "in use" for a moment after it is gone.
                if "in use" not in exc.message or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(UNPLUG_POLL_S)


