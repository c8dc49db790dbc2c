"""Volumes: durable block storage, attached explicitly, never part of a snapshot.

A volume is a sparse raw file ``$TENKI_HOME/volumes/vol_x.img`` owned by the server::

    AVAILABLE ──attach──> IN_USE ──detach / its session ended──> AVAILABLE
        └──delete──> DELETING ──file removed──> DELETED

Attaching hot-plugs the file into the session's VM (``blockdev-add`` file + raw nodes, then
``device_add virtio-blk-pci`` on a free ``pcie-root-port`` with ``serial=<volume id>``); the guest
agent then finds the disk by its serial and mounts it, formatting it ext4 on first use. A
read-only attachment uses read-only block nodes, so the guest sees a read-only disk and the refusal
to write is the guest kernel's, not a convention. Detaching unmounts in the guest first (which
writes the filesystem back), unplugs, waits until QEMU has really dropped the device (the guest
must acknowledge the eject) and only then deletes the block nodes.

Records: a volume row is reserved (IN_USE with its session and path) before the hot-plug, so two
callers can never take one volume; the session row's ``volumes`` list gets the attachment once the
guest has it mounted. ``recover`` reconciles both with what QEMU really holds after a restart.

Snapshots hold no volume data, and QEMU cannot restore a memory snapshot taken with a disk plugged
unless that disk is plugged again ("Unknown savevm section"). So the capture job calls
``unplug_for_capture`` (unmount, unplug) before it pauses the guest and ``replug_after_capture``
after: the captured guest has neither the disk nor the mount, a restore starts clean, and the
source gets its volumes back, mounted where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import Layout
from ..engine.agent import AgentError
from ..engine.machine import HOTPLUG_PORTS, Machine, MachineError
from ..errors import (
    ConflictError,
    InternalError,
    TenkiError,
    ValidationError,
    VolumeNotFoundError,
)
from ..ids import new_id
from ..models import (
    FINAL_SESSION_STATES,
    LIVE_SESSION_STATES,
    Session,
    SessionCreate,
    Volume,
    VolumeAttach,
    VolumeAttachment,
    VolumeCreate,
    VolumeState,
)
from ..sessions.service import Runtime, SessionService
from ..store.db import Store
from ..store.tables import SessionRow, VolumeRow

log = logging.getLogger(__name__)

SECTOR = 512
# mkfs.ext4 of a large volume writes its group descriptors and bitmaps: seconds under TCG.
MOUNT_TIMEOUT_S = 300.0
UMOUNT_TIMEOUT_S = 60.0
# The guest must acknowledge the eject before QEMU drops the device; it takes ~0.1 s.
UNPLUG_TIMEOUT_S = 15.0
UNPLUG_POLL_S = 0.02
# a hung guest must not hold a terminate for long; its data is lost either way
STOP_FLUSH_TIMEOUT_S = 10.0

# Mounting over these would hide the guest's own system (and the agent with it).
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/run")
_SYSTEM_DIRS = frozenset({"/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                          "/sbin", "/usr", "/var"})

_FINAL = frozenset(s.value for s in FINAL_SESSION_STATES)
_LIVE = frozenset(s.value for s in LIVE_SESSION_STATES)

EXT_SUPERBLOCK = 1024
EXT_MAGIC = b"\x53\xef"
EXT_INCOMPAT_RECOVER = 0x4


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: VolumeRow) -> Volume:
    return Volume(id=row.id, name=row.name, size_bytes=row.size_bytes,
                  state=VolumeState(row.state), session_id=row.session_id, path=row.path,
                  read_only=bool(row.read_only), created_at=row.created_at)


def device_id(volume_id: str) -> str:
    return f"dev-{volume_id}"


def file_node(volume_id: str) -> str:
    return f"vf-{volume_id}"


def disk_node(volume_id: str) -> str:
    return f"vd-{volume_id}"


def mount_path(path: str, field: str = "path") -> str:
    """The canonical guest path of a mount, or a ValidationError naming ``field``."""
    if not path or not path.startswith("/"):
        raise ValidationError(f"must be an absolute path, got {path!r}", field=field)
    if "\0" in path or ".." in path.split("/"):
        raise ValidationError(f"must not contain '..' or NUL, got {path!r}", field=field)
    norm = "/" + posixpath.normpath(path).lstrip("/")
    if norm == "/":
        raise ValidationError("cannot mount a volume over /", field=field)
    if norm in _SYSTEM_DIRS or any(norm == t or norm.startswith(t + "/")
                                   for t in _SYSTEM_TREES):
        raise ValidationError(f"{norm} belongs to the guest system; choose another path",
                              field=field)
    return norm


def attachments(row: SessionRow | None) -> list[VolumeAttachment]:
    return [VolumeAttachment(**v) for v in (row.volumes or [])] if row else []


# -- host side of the volume file ------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_sparse_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        _fsync_dir(path.parent)


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


# -- QEMU side --------------------------------------------------------------------------------

async def _peripherals(machine: Machine) -> set[str]:
    return {item["name"] for item in await machine.execute(
        "qom-list", {"path": "/machine/peripheral"})}


async def _block_nodes(machine: Machine) -> set[str]:
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
    if dev in await _peripherals(machine):
        try:
            await machine.execute("device_del", {"id": dev})
        except MachineError as exc:
            if "not found" not in exc.message.lower():
                raise
        # device_del only asks the guest; the block nodes stay busy until it has let go.
        deadline = time.monotonic() + timeout
        while dev in await _peripherals(machine):
            if time.monotonic() > deadline:
                raise InternalError(f"the guest did not release volume {volume_id} within "
                                    f"{timeout:g}s")
            await asyncio.sleep(UNPLUG_POLL_S)
    await drop_nodes(machine, volume_id, deadline=time.monotonic() + timeout)


async def drop_nodes(machine: Machine, volume_id: str, deadline: float = 0.0) -> None:
    nodes = await _block_nodes(machine)
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


class VolumeService:
    def __init__(self, layout: Layout, store: Store, sessions: SessionService) -> None:
        self.layout = layout
        self.store = store
        self.sessions = sessions
        layout.volumes.mkdir(parents=True, exist_ok=True)
        sessions.volume_checks = [self.check_create]
        sessions.volume_attacher = self.attach_at_start
        sessions.on_gone.append(self._session_gone)
        # Terminating kills the VM: the guest's page cache (ext4 holds written data there for up
        # to 30 s) would die with it, and a journal left to replay cannot be mounted read-only.
        sessions.before_stop.append(self.flush_before_stop)

    def file(self, volume_id: str) -> Path:
        return self.layout.volumes / f"{volume_id}.img"

    # -- records ----------------------------------------------------------------------------
    def _row(self, volume_id: str) -> VolumeRow:
        row = self.store.get_volume(volume_id)
        if row is None:
            raise VolumeNotFoundError(f"volume {volume_id} not found")
        return self._reconcile(row)

    def _usable(self, volume_id: str) -> VolumeRow:
        row = self._row(volume_id)
        if row.state in (VolumeState.DELETED.value, VolumeState.DELETING.value):
            raise VolumeNotFoundError(f"volume {volume_id} not found (it was deleted)")
        return row

    def _reconcile(self, row: VolumeRow) -> VolumeRow:
        """An IN_USE volume whose session has ended is AVAILABLE: a VM that died on its own
        does not call the session-gone hook, and its QEMU holds nothing any more."""
        if row.state != VolumeState.IN_USE.value:
            return row
        srow = self.store.get_session(row.session_id) if row.session_id else None
        if srow is None or srow.state in _FINAL:
            log.info("%s: session %s has ended; volume available again", row.id, row.session_id)
            self._release(row.id)
            if srow is not None and srow.volumes:
                self.store.update(SessionRow, srow.id, volumes=[])
            fresh = self.store.get_volume(row.id)
            assert fresh is not None
            return fresh
        return row

    @staticmethod
    def _check_free(row: VolumeRow) -> None:
        if row.state == VolumeState.IN_USE.value:
            where = f" at {row.path}" if row.path else ""
            raise ConflictError(f"volume {row.id} is in use by session {row.session_id}{where}; "
                                "a volume is attached to one session at a time")

    def _reserve(self, volume_id: str, session_id: str, path: str, read_only: bool) -> None:
        self.store.update(VolumeRow, volume_id, state=VolumeState.IN_USE.value,
                          session_id=session_id, path=path, read_only=int(read_only))

    def _release(self, volume_id: str) -> None:
        self.store.update(VolumeRow, volume_id, state=VolumeState.AVAILABLE.value,
                          session_id=None, path=None, read_only=0)

    def _record_attached(self, session_id: str, att: VolumeAttachment) -> None:
        row = self.store.get_session(session_id)
        current = [a for a in attachments(row) if a.volume_id != att.volume_id]
        self.store.update(SessionRow, session_id,
                          volumes=[a.model_dump() for a in [*current, att]])

    def _record_detached(self, session_id: str, volume_id: str) -> None:
        row = self.store.get_session(session_id)
        left = [a.model_dump() for a in attachments(row) if a.volume_id != volume_id]
        self.store.update(SessionRow, session_id, volumes=left)
        vrow = self.store.get_volume(volume_id)
        if vrow is not None and vrow.session_id == session_id:
            self._release(volume_id)

    # -- create, list, get, delete ------------------------------------------------------------
    async def create(self, req: VolumeCreate) -> Volume:
        name = req.name.strip()
        if not name:
            raise ValidationError("must not be empty", field="name")
        # a block device is whole sectors
        size = -(-req.size_bytes // SECTOR) * SECTOR
        row = VolumeRow(id=new_id("volume"), name=name, size_bytes=size,
                        state=VolumeState.AVAILABLE.value, session_id=None, path=None,
                        read_only=0, created_at=now())
        path = self.file(row.id)
        try:
            await asyncio.to_thread(make_sparse_file, path, size)
        except OSError as exc:
            raise InternalError(f"cannot create {path}: {exc}") from exc
        try:
            self.store.add(row)
        except BaseException:
            remove_file(path)
            raise
        log.info("%s: created (%d bytes, %s)", row.id, size, name)
        return to_model(row)

    def query(self) -> list[Volume]:
        rows = [self._reconcile(r) for r in self.store.all(VolumeRow)
                if r.state != VolumeState.DELETED.value]
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    def get(self, volume_id: str) -> Volume:
        return to_model(self._row(volume_id))

    async def delete(self, volume_id: str) -> Volume:
        row = self._row(volume_id)
        if row.state == VolumeState.DELETED.value:
            return to_model(row)
        if row.state == VolumeState.IN_USE.value:
            raise ConflictError(f"volume {volume_id} is attached to session {row.session_id} "
                                f"at {row.path}; detach it (or terminate the session) first")
        self.store.update(VolumeRow, volume_id, state=VolumeState.DELETING.value)
        await self._finish_delete(volume_id)
        return to_model(self._row(volume_id))

    async def _finish_delete(self, volume_id: str) -> None:
        await asyncio.to_thread(remove_file, self.file(volume_id))
        self.store.update(VolumeRow, volume_id, state=VolumeState.DELETED.value,
                          deleted_at=now())
        log.info("%s: deleted", volume_id)

    # -- attach and detach ------------------------------------------------------------------------
    def check_create(self, req: SessionCreate) -> None:
        """Refuse a session create whose volumes cannot be attached, before anything starts."""
        if len(req.volumes) > HOTPLUG_PORTS:
            raise ValidationError(f"a session takes at most {HOTPLUG_PORTS} volumes",
                                  field="volumes")
        paths: dict[str, str] = {}
        for i, mount in enumerate(req.volumes):
            path = mount_path(mount.path, f"volumes.{i}.path")
            if path in paths:
                raise ValidationError(f"{paths[path]} and {mount.volume_id} are both to be "
                                      f"mounted at {path}", field="volumes")
            if mount.volume_id in paths.values():
                raise ValidationError(f"volume {mount.volume_id} is given twice",
                                      field="volumes")
            paths[path] = mount.volume_id
            self._check_free(self._usable(mount.volume_id))

    async def attach_at_start(self, session_id: str, req: SessionCreate) -> None:
        """The ``--volume`` mounts of a create, once its VM runs (booted or restored); the
        session may still be CREATING."""
        rt = self.sessions.runtimes.get(session_id)
        if rt is None:
            raise ConflictError(f"session {session_id} has no VM to attach volumes to")
        failed: list[str] = []
        for mount in req.volumes:
            try:
                await self._attach(session_id, rt, VolumeAttach(
                    volume_id=mount.volume_id, path=mount.path, read_only=mount.read_only))
            except TenkiError as exc:
                failed.append(exc.message)
            except Exception as exc:
                failed.append(f"{mount.volume_id}: {type(exc).__name__}: {exc}")
        if failed:
            raise ConflictError("; ".join(failed))

    async def attach(self, session_id: str, req: VolumeAttach) -> Session:
        mount_path(req.path)
        return await self._attach(session_id, self.sessions.live(session_id), req)

    async def _attach(self, session_id: str, rt: Runtime, req: VolumeAttach) -> Session:
        path = mount_path(req.path)
        row = self._usable(req.volume_id)
        current = attachments(self.sessions.row(session_id))
        for att in current:
            if att.volume_id == row.id:
                if att.path == path and att.read_only == req.read_only:
                    return self.sessions.get(session_id)
                raise ConflictError(f"volume {row.id} is already attached to session "
                                    f"{session_id} at {att.path}")
            if att.path == path:
                raise ValidationError(f"volume {att.volume_id} is already mounted at {path} "
                                      f"in session {session_id}", field="path")
        self._check_free(row)
        # reserved before the first await: a concurrent attach of this volume sees IN_USE
        self._reserve(row.id, session_id, path, req.read_only)
        try:
            async with rt.lock:
                if self.sessions.runtimes.get(session_id) is not rt:
                    raise ConflictError(f"session {session_id} ended during the attach")
                t0 = time.monotonic()
                await self._plug_and_mount(rt, row.id, path, req.read_only, mkfs=True)
                self._record_attached(session_id, VolumeAttachment(
                    volume_id=row.id, path=path, read_only=req.read_only))
                log.info("%s: attached to %s at %s%s in %.3fs", row.id, session_id, path,
                         " (read-only)" if req.read_only else "", time.monotonic() - t0)
        except BaseException:
            vrow = self.store.get_volume(row.id)
            if vrow is not None and vrow.session_id == session_id and not any(
                    a.volume_id == row.id for a in attachments(self.store.get_session(session_id))):
                self._release(row.id)
            raise
        return self.sessions.get(session_id)

    async def detach(self, session_id: str, volume_id: str) -> Session:
        srow = self.sessions.row(session_id)
        self._row(volume_id)
        if not any(a.volume_id == volume_id for a in attachments(srow)):
            raise ConflictError(f"volume {volume_id} is not attached to session {session_id}")
        rt = self.sessions.live(session_id)
        async with rt.lock:
            att = next((a for a in attachments(self.sessions.row(session_id))
                        if a.volume_id == volume_id), None)
            if att is None:  # a concurrent detach won
                return self.sessions.get(session_id)
            t0 = time.monotonic()
            await self._umount_and_unplug(rt, att)
            self._record_detached(session_id, volume_id)
            log.info("%s: detached from %s in %.3fs", volume_id, session_id,
                     time.monotonic() - t0)
        return self.sessions.get(session_id)

    async def _plug_and_mount(self, rt: Runtime, volume_id: str, path: str, read_only: bool,
                              mkfs: bool) -> None:
        file = self.file(volume_id)
        if not file.exists():
            raise InternalError(f"the file of volume {volume_id} is missing: {file}")
        if read_only:
            await asyncio.to_thread(replay_journal, file)
        await plug(rt.machine, volume_id, file, read_only)
        try:
            await rt.agent.mount(volume_id, path, read_only, mkfs and not read_only,
                                 timeout=MOUNT_TIMEOUT_S)
        except BaseException as exc:
            with contextlib.suppress(TenkiError):
                await unplug(rt.machine, volume_id)
            if isinstance(exc, AgentError):
                raise _mount_error(exc, volume_id, path, read_only) from exc
            raise

    async def _umount_and_unplug(self, rt: Runtime, att: VolumeAttachment) -> None:
        try:
            await rt.agent.umount(att.path, timeout=UMOUNT_TIMEOUT_S)
        except AgentError as exc:
            if exc.errno == "EBUSY":
                raise ConflictError(
                    f"volume {att.volume_id} cannot be unmounted: {att.path} is busy in session "
                    f"{rt.session_id} (a process has a file or its working directory there)"
                ) from exc
            raise
        await unplug(rt.machine, att.volume_id)

    # -- snapshots ----------------------------------------------------------------------------
    async def unplug_for_capture(self, rt: Runtime) -> list[VolumeAttachment]:
        """Unmount and unplug every volume of the session (the capture job holds ``rt.lock``);
        returns them in the order they came off. On failure the session keeps them all."""
        done: list[VolumeAttachment] = []
        try:
            for att in reversed(attachments(self.store.get_session(rt.session_id))):
                t0 = time.monotonic()
                try:
                    await self._umount_and_unplug(rt, att)
                except ConflictError as exc:
                    raise ConflictError(
                        f"volume {att.volume_id} must be unmounted for the snapshot (volumes are "
                        f"never part of one), but {att.path} is busy in the guest: a process has "
                        "a file or its working directory there") from exc
                done.append(att)
                log.info("%s: unplugged from %s for a capture in %.3fs", att.volume_id,
                         rt.session_id, time.monotonic() - t0)
        except BaseException:
            await self.replug_after_capture(rt, done)
            raise
        return done

    async def replug_after_capture(self, rt: Runtime, unplugged: list[Any]) -> None:
        for att in reversed(unplugged):
            t0 = time.monotonic()
            try:
                await self._plug_and_mount(rt, att.volume_id, att.path, att.read_only,
                                           mkfs=False)
                log.info("%s: back in %s after the capture in %.3fs", att.volume_id,
                         rt.session_id, time.monotonic() - t0)
            except Exception as exc:
                # the guest has lost this volume: the records say so rather than pretend
                log.warning("%s: could not be re-attached to %s after a capture: %s",
                            att.volume_id, rt.session_id, exc)
                self._record_detached(rt.session_id, att.volume_id)

    # -- session life -------------------------------------------------------------------------
    async def flush_before_stop(self, session_id: str) -> None:
        """Unmount the volumes of a session about to be stopped; never blocks the stop."""
        row = self.store.get_session(session_id)
        rt = self.sessions.runtimes.get(session_id)
        if rt is None or row is None or row.state not in _LIVE or not row.volumes:
            return
        try:
            async with asyncio.timeout(STOP_FLUSH_TIMEOUT_S), rt.lock:
                for att in reversed(attachments(self.store.get_session(session_id))):
                    await self._flush_one(rt, att)
        except (TimeoutError, TenkiError) as exc:
            log.warning("%s: volumes not flushed before the stop: %s", session_id, exc)

    async def _flush_one(self, rt: Runtime, att: VolumeAttachment) -> None:
        try:
            await rt.agent.umount(att.path, timeout=UMOUNT_TIMEOUT_S)
            return
        except AgentError as exc:
            log.info("%s: umount %s before the stop failed (%s); freezing it instead",
                     rt.session_id, att.path, exc.message)
        # Files are open there. A freeze writes everything back and leaves the journal clean,
        # just as an unmount would; the VM is stopped right after, frozen.
        proc = await rt.agent.exec(["fsfreeze", "--freeze", att.path], timeout_s=30)
        if await proc.wait() != 0:
            await rt.agent.sync(timeout=30)

    async def _session_gone(self, session_id: str) -> None:
        for row in self.store.all(VolumeRow, VolumeRow.session_id == session_id):
            if row.state == VolumeState.IN_USE.value:
                log.info("%s: session %s ended; volume available again", row.id, session_id)
                self._release(row.id)
        self.store.update(SessionRow, session_id, volumes=[])

    # -- recovery -----------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a (re)start: finish deletions, free the volumes of ended sessions, and make the
        records of live sessions match the devices their QEMU really has."""
        for row in self.store.all(VolumeRow):
            if row.state == VolumeState.DELETING.value:
                await self._finish_delete(row.id)
            else:
                self._reconcile(row)
        for session_id, rt in list(self.sessions.runtimes.items()):
            try:
                await self._recover_session(session_id, rt)
            except TenkiError as exc:
                log.warning("%s: volumes not recovered: %s", session_id, exc.message)
        for row in self.store.all(VolumeRow):
            # reserved for a session that is not running here (an attach cut short by a stop)
            if row.state == VolumeState.IN_USE.value and row.session_id not in \
                    self.sessions.runtimes:
                self._release(row.id)
        known = {f"{r.id}.img" for r in self.store.all(VolumeRow)
                 if r.state != VolumeState.DELETED.value}
        for stray in self.layout.volumes.glob("vol_*.img"):
            if stray.name not in known:
                log.info("removing %s: no volume owns it", stray)
                await asyncio.to_thread(remove_file, stray)

    async def _recover_session(self, session_id: str, rt: Runtime) -> None:
        present = await _peripherals(rt.machine)
        recorded = attachments(self.store.get_session(session_id))
        for att in recorded:
            if device_id(att.volume_id) in present:
                try:
                    # idempotent; remounts what a detach cut short had unmounted
                    await rt.agent.mount(att.volume_id, att.path, att.read_only, False,
                                         timeout=MOUNT_TIMEOUT_S)
                except TenkiError as exc:
                    log.warning("%s: %s is plugged but not mounted at %s: %s", session_id,
                                att.volume_id, att.path, exc.message)
                continue
            try:
                # a capture cut short had unplugged it
                await self._plug_and_mount(rt, att.volume_id, att.path, att.read_only,
                                           mkfs=False)
                log.info("%s: %s plugged again at %s", session_id, att.volume_id, att.path)
            except TenkiError as exc:
                log.warning("%s: %s could not be plugged again: %s", session_id,
                            att.volume_id, exc.message)
                self._record_detached(session_id, att.volume_id)
        ids = {a.volume_id for a in recorded}
        for row in self.store.all(VolumeRow, VolumeRow.session_id == session_id):
            if row.id in ids or row.state != VolumeState.IN_USE.value:
                continue
            # an attach cut short: undo it
            if device_id(row.id) in present and row.path:
                with contextlib.suppress(TenkiError):
                    await rt.agent.umount(row.path, timeout=UMOUNT_TIMEOUT_S)
            with contextlib.suppress(TenkiError):
                await unplug(rt.machine, row.id)
            self._release(row.id)


__all__ = ["VolumeService", "mount_path", "needs_journal_replay", "to_model"]
