"""Volumes on this host: their files, and plugging them into a VM and mounting them.

A volume is a sparse raw file in the host's volume directory (volumes stay on their host).
Mounting formats it ext4 on first use. Snapshots hold no volume data, and QEMU cannot restore a
memory snapshot taken with a disk plugged unless that disk is plugged again ("Unknown savevm
section"), so a capture unmounts and unplugs every volume first and plugs them back after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..engine import hotplug
from ..engine.agent import AgentError
from ..errors import ConflictError, InternalError, TenkiError
from ..fsync import fsync_path
from .api import VolumeMountSpec
from .vm import VM

log = logging.getLogger(__name__)

# mkfs.ext4 of a large volume writes its group descriptors and bitmaps: seconds under TCG.
MOUNT_TIMEOUT_S = 300.0
UMOUNT_TIMEOUT_S = 60.0
# a hung guest must not hold a terminate for long; its data is lost either way
STOP_FLUSH_TIMEOUT_S = 10.0

EXT_SUPERBLOCK = 1024
EXT_MAGIC = b"\x53\xef"
EXT_INCOMPAT_RECOVER = 0x4



def make_sparse_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_path(path.parent)


def needs_journal_replay(path: Path) -> bool:
    """True when the ext4 filesystem in ``path`` was not cleanly unmounted (its VM died)."""
    try:
        with open(path, "rb") as f:
            f.seek(EXT_SUPERBLOCK)
            sb = f.read(0x64)
    except OSError:
        return False
    if len(sb) < 0x64 or sb[0x38:0x3A] != EXT_MAGIC:
        return False
    return bool(int.from_bytes(sb[0x60:0x64], "little") & EXT_INCOMPAT_RECOVER)


def replay_journal(path: Path) -> None:
    """A read-only disk cannot be mounted while its journal waits for a replay (the kernel would
    have to write): replay it here, where the file is not in any VM."""
    e2fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
    if not needs_journal_replay(path) or not os.path.exists(e2fsck):
        return
    r = subprocess.run([e2fsck, "-y", "-E", "journal_only", str(path)], capture_output=True,
                       text=True, timeout=300)
    if r.returncode not in (0, 1):
        log.warning("%s: journal replay failed (%d): %s", path.name, r.returncode,
                    (r.stdout + r.stderr).strip()[-300:])


def _mount_error(exc: AgentError, volume_id: str, path: str, read_only: bool) -> TenkiError:
    if exc.errno == "EBUSY":
        return ConflictError(f"cannot mount volume {volume_id}: {path} is already a mount point "
                             "in the guest")
    if exc.errno == "EINVAL" and "no filesystem" in exc.message and read_only:
        return ConflictError(f"volume {volume_id} is blank: attach it read-write once (it is "
                             "formatted then) before attaching it read-only")
    if exc.errno == "EINVAL" and "holds data" in exc.message:
        return ConflictError(f"volume {volume_id} holds data but no ext4 filesystem; tenki "
                             "does not format it over")
    return exc


async def plug_and_mount(vm: VM, file: Path, mount: VolumeMountSpec, *, mkfs: bool) -> None:
    """Caller holds ``vm.lock``."""
    if not file.exists():
        raise InternalError(f"the file of volume {mount.volume_id} is missing on this host")
    if mount.read_only:
        await asyncio.to_thread(replay_journal, file)
    await hotplug.plug(vm.machine, mount.volume_id, file, mount.read_only)
    try:
        await vm.agent.mount(mount.volume_id, mount.path, mount.read_only,
                             mkfs and not mount.read_only, timeout=MOUNT_TIMEOUT_S)
    except BaseException as exc:
        with contextlib.suppress(TenkiError):
            await hotplug.unplug(vm.machine, mount.volume_id)
        if isinstance(exc, AgentError):
            mapped = _mount_error(exc, mount.volume_id, mount.path, mount.read_only)
            if mapped is not exc:  # an unknown agent error goes up as it is
                raise mapped from exc
        raise
    vm.volumes[mount.volume_id] = mount


async def umount_and_unplug(vm: VM, mount: VolumeMountSpec) -> None:
    """Caller holds ``vm.lock``."""
    try:
        await vm.agent.umount(mount.path, timeout=UMOUNT_TIMEOUT_S)
    except AgentError as exc:
        if exc.errno == "EBUSY":
            raise ConflictError(
                f"volume {mount.volume_id} cannot be unmounted: {mount.path} is busy in session "
                f"{vm.session_id} (a process has a file or its working directory there)"
            ) from exc
        raise
    await hotplug.unplug(vm.machine, mount.volume_id)
    vm.volumes.pop(mount.volume_id, None)


async def unplug_for_capture(vm: VM, mounts: list[VolumeMountSpec],
                             file_of: Callable[[str], Path]) -> list[VolumeMountSpec]:
    """Unmount and unplug every volume (in reverse order); on failure put back what came off."""
    done: list[VolumeMountSpec] = []
    try:
        for mount in reversed(mounts):
            try:
                await umount_and_unplug(vm, mount)
            except ConflictError as exc:
                raise ConflictError(
                    f"volume {mount.volume_id} must be unmounted for the snapshot (volumes are "
                    f"never part of one), but {mount.path} is busy in the guest: a process has "
                    "a file or its working directory there") from exc
            done.append(mount)
    except BaseException:
        await replug(vm, done, file_of)
        raise
    return done


async def replug(vm: VM, mounts: list[VolumeMountSpec],
                 file_of: Callable[[str], Path]) -> list[str]:
    """Plug back what a capture took off; returns the volumes that could not be."""
    lost = []
    for mount in reversed(mounts):
        try:
            await plug_and_mount(vm, file_of(mount.volume_id), mount,
                                 mkfs=False)
        except Exception as exc:
            log.warning("%s: could not be re-attached to %s after a capture: %s",
                        mount.volume_id, vm.session_id, exc)
            lost.append(mount.volume_id)
    return lost


async def flush_before_stop(vm: VM, mounts: list[VolumeMountSpec]) -> None:
    """Unmount (or freeze) the volumes of a VM about to be stopped; never blocks the stop.

    Terminating kills the VM: the guest's page cache (ext4 holds written data there for up to
    30 s) would die with it, and a journal left to replay cannot be mounted read-only."""
    if not mounts:
        return
    try:
        async with asyncio.timeout(STOP_FLUSH_TIMEOUT_S):
            for mount in reversed(mounts):
                await _flush_one(vm, mount)
    except (TimeoutError, TenkiError) as exc:
        log.warning("%s: volumes not flushed before the stop: %s", vm.session_id, exc)


async def _flush_one(vm: VM, mount: VolumeMountSpec) -> None:
    try:
        await vm.agent.umount(mount.path, timeout=UMOUNT_TIMEOUT_S)
        return
    except AgentError as exc:
        log.info("%s: umount %s before the stop failed (%s); freezing it instead",
                 vm.session_id, mount.path, exc.message)
    # Files are open there. A freeze writes everything back and leaves the journal clean,
    # just as an unmount would; the VM is stopped right after, frozen.
    proc = await vm.agent.exec(["fsfreeze", "--freeze", mount.path], timeout_s=30)
    if await proc.wait() != 0:
        await vm.agent.sync(timeout=30)


async def recover_mounts(vm: VM, mounts: list[VolumeMountSpec],
                         file_of: Callable[[str], Path]) -> list[str]:
    """After a restart: make the VM hold exactly ``mounts``; returns the ones it could not."""
    present = await hotplug.peripherals(vm.machine)
    lost = []
    for mount in mounts:
        if hotplug.device_id(mount.volume_id) in present:
            try:
                # idempotent; remounts what a detach cut short had unmounted
                await vm.agent.mount(mount.volume_id, mount.path, mount.read_only, False,
                                     timeout=MOUNT_TIMEOUT_S)
                vm.volumes[mount.volume_id] = mount
            except TenkiError as exc:
                log.warning("%s: %s is plugged but not mounted at %s: %s", vm.session_id,
                            mount.volume_id, mount.path, exc.message)
            continue
        try:
            # a capture cut short had unplugged it
            await plug_and_mount(vm, file_of(mount.volume_id), mount,
                                 mkfs=False)
        except TenkiError as exc:
            log.warning("%s: %s could not be plugged again: %s", vm.session_id,
                        mount.volume_id, exc.message)
            lost.append(mount.volume_id)
    wanted = {m.volume_id for m in mounts}
    for dev in present:
        if dev.startswith("dev-vol_") and dev.removeprefix("dev-") not in wanted:
            # an attach cut short: undo it
            with contextlib.suppress(TenkiError):
                await hotplug.unplug(vm.machine, dev.removeprefix("dev-"))
    # block nodes left without a device by an attach cut short would keep the file locked
    for node in await hotplug.block_nodes(vm.machine):
        vid = node[3:] if node.startswith(("vf-vol_", "vd-vol_")) else None
        if vid and vid not in wanted:
            with contextlib.suppress(TenkiError):
                await hotplug.drop_nodes(vm.machine, vid)
    return lost
