"""Volumes: records and state changes. The volume record is the one truth about an attachment
(its ``session_id``, ``path``, ``read_only``); a session's attachments are read from it.

A volume is reserved (AVAILABLE -> IN_USE, compare-and-set) before the host plugs it, so two
callers can never take one volume; a failed attach moves it back.
"""

from __future__ import annotations

import logging
import posixpath
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..errors import ConflictError, TenkiError, ValidationError, VolumeNotFoundError
from ..host.api import VolumeMountSpec
from ..ids import new_id
from ..models import (
    SessionCreate,
    Volume,
    VolumeAttach,
    VolumeAttachment,
    VolumeCreate,
    VolumeMount,
    VolumeState,
    VolumeUpdate,
)
from ..store.tables import SessionRow, VolumeRow
from . import admission
from .fleet import LOCAL
from .records import Records
from .states import LIVE, PAUSE_STATES, IllegalTransitionError

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger(__name__)

V = VolumeState
SECTOR = 512
HOTPLUG_PORTS = 4

# Mounting over these would hide the guest's own system (and the agent with it).
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/run")
_SYSTEM_DIRS = frozenset({"/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                          "/sbin", "/usr", "/var"})


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: VolumeRow) -> Volume:
    return Volume(id=row.id, workspace_id=row.workspace_id, name=row.name,
                  size_bytes=row.size_bytes, state=VolumeState(row.state),
                  session_id=row.session_id, path=row.path,
                  read_only=bool(row.read_only), created_at=row.created_at,
                  host_id=row.host_id)


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


class VolumeControl:
    def __init__(self, records: Records, host: Fleet) -> None:
        self.records = records
        self.host = host

    # -- reads -------------------------------------------------------------------------------
    def row(self, volume_id: str, ws: str | None = None) -> VolumeRow:
        """``ws``: the caller's workspace (a volume of another one is not found)."""
        return self.records.get(VolumeRow, volume_id, ws=ws)

    def usable(self, volume_id: str, ws: str | None = None) -> VolumeRow:
        row = self.row(volume_id, ws)
        if row.state in (V.DELETED.value, V.DELETING.value):
            raise VolumeNotFoundError(f"volume {volume_id} not found (it was deleted)")
        return row

    def get(self, volume_id: str, ws: str | None = None) -> Volume:
        return to_model(self.row(volume_id, ws))

    def query(self, ws: str) -> list[Volume]:
        rows = [r for r in self.records.all(VolumeRow, VolumeRow.workspace_id == ws)
                if r.state != V.DELETED.value]
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    def _attached_rows(self, session_id: str) -> list[VolumeRow]:
        """By path: a mount comes before every mount inside it (a prefix sorts first), so
        plugging in this order and unmounting in reverse nests them right whatever order the
        volumes were created or attached in."""
        rows = self.records.all(VolumeRow, VolumeRow.session_id == session_id)
        rows = [r for r in rows if r.state == V.IN_USE.value]
        rows.sort(key=lambda r: r.path or "")
        return rows

    def attachments(self, session_id: str) -> list[VolumeAttachment]:
        return [VolumeAttachment(volume_id=r.id, path=r.path or "", read_only=bool(r.read_only))
                for r in self._attached_rows(session_id)]

    def mounts_of(self, session_id: str) -> list[VolumeMountSpec]:
        return [VolumeMountSpec(a.volume_id, a.path, a.read_only)
                for a in self.attachments(session_id)]

    # -- create and delete ---------------------------------------------------------------------
    async def create(self, req: VolumeCreate, ws: str) -> Volume:
        name = req.name.strip()
        if not name:
            raise ValidationError("must not be empty", field="name")
        size = -(-req.size_bytes // SECTOR) * SECTOR  # a block device is whole sectors
        # a volume stays on the host that holds its file; its sessions are placed there
        host_id = self.host.place_volume()
        row = VolumeRow(id=new_id("volume"), workspace_id=ws, name=name, size_bytes=size,
                        state=V.AVAILABLE.value, session_id=None, path=None, read_only=0,
                        host_id=host_id, created_at=now())
        await self.host.create_volume_on(host_id, row.id, size)
        try:
            await self.records.insert(row, check=admission.volume(ws, size))
        except BaseException:
            await self.host.member(host_id).delete_volume(row.id)
            raise
        log.info("%s: created (%d bytes, %s)", row.id, size, name)
        return to_model(row)

    async def rename(self, volume_id: str, req: VolumeUpdate, ws: str | None = None) -> Volume:
        """A new name for a volume that is not being deleted."""
        self.row(volume_id, ws)  # not found (or another workspace's): say so
        name = req.name.strip()
        if not name:
            raise ValidationError("must not be empty", field="name")
        if not await self.records.update(VolumeRow, volume_id,
                                         when_state=[V.AVAILABLE, V.IN_USE], name=name):
            raise ConflictError(f"volume {volume_id} is {self.row(volume_id).state}; it can no "
                                "longer be renamed")
        return self.get(volume_id, ws)

    async def delete(self, volume_id: str, ws: str | None = None) -> Volume:
        row = self.row(volume_id, ws)
        if row.state == V.DELETED.value:
            return to_model(row)
        if row.state == V.IN_USE.value:
            # "volume is attached": the words the official SDKs read as VolumeInUse
            raise ConflictError(f"cannot delete {volume_id}: the volume is attached to session "
                                f"{row.session_id} at {row.path}; detach it (or terminate the "
                                "session) first")
        if row.state == V.AVAILABLE.value:
            try:
                await self.records.transition(VolumeRow, volume_id, V.DELETING)
            except IllegalTransitionError as exc:
                raise ConflictError(exc.message) from exc
        await self._finish_delete(volume_id)
        return self.get(volume_id)

    async def _finish_delete(self, volume_id: str) -> None:
        await self.host.delete_volume(volume_id)
        try:
            await self.records.transition(VolumeRow, volume_id, V.DELETED,
                                          expected=[V.DELETING], deleted_at=now())
        except IllegalTransitionError:
            if self.row(volume_id).state != V.DELETED.value:
                raise
            return  # a concurrent delete finished first: deleted is deleted
        log.info("%s: deleted", volume_id)

    # -- attach and detach -------------------------------------------------------------------
    def check_create(self, req: SessionCreate, ws: str) -> None:
        """Refuse a session create whose volumes cannot be attached, before anything starts."""
        mounts = list(req.volumes)
        if len(mounts) > HOTPLUG_PORTS:
            raise ValidationError(f"a session takes at most {HOTPLUG_PORTS} volumes",
                                  field="volumes")
        paths: dict[str, str] = {}
        for i, mount in enumerate(mounts):
            path = mount_path(mount.path, f"volumes.{i}.path")
            if path in paths:
                raise ValidationError(f"{paths[path]} and {mount.volume_id} are both to be "
                                      f"mounted at {path}", field="volumes")
            if mount.volume_id in paths.values():
                raise ValidationError(f"volume {mount.volume_id} is given twice",
                                      field="volumes")
            paths[path] = mount.volume_id
            self._check_free(self.usable(mount.volume_id, ws))

    @staticmethod
    def _check_free(row: VolumeRow) -> None:
        if row.state == V.IN_USE.value:
            where = f" at {row.path}" if row.path else ""
            raise ConflictError(f"{row.id}: the volume is in use by session "
                                f"{row.session_id}{where}; a volume is attached to one session "
                                "at a time")

    async def attach_at_start(self, session_id: str, mounts: list[VolumeMount]) -> str | None:
        """The ``--volume`` mounts of a create, once its VM runs; a warning if any failed."""
        failed: list[str] = []
        # parent first, as ``mounts_of``: /a/b given before /a must not end up hidden under /a
        for mount in sorted(mounts, key=lambda m: posixpath.normpath(m.path)):
            try:
                await self._attach(session_id, VolumeAttach(
                    volume_id=mount.volume_id, path=mount.path, read_only=mount.read_only))
            except TenkiError as exc:
                failed.append(exc.message)
            except Exception as exc:
                failed.append(f"{mount.volume_id}: {type(exc).__name__}: {exc}")
        return f"volume attach failed: {'; '.join(failed)}" if failed else None

    async def reattach(self, session_id: str) -> str | None:
        """A resumed session's volumes (attached to it while it was paused), plugged into its
        new VM; the ones that fail are released. A warning naming those, or None."""
        failed: list[str] = []
        for mount in self.mounts_of(session_id):
            try:
                await self.host.attach_volume(session_id, mount)
            except Exception as exc:
                why = exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"
                failed.append(f"{mount.volume_id}: {why}")
                await self._release(mount.volume_id, session_id)
        return f"volume attach failed: {'; '.join(failed)}" if failed else None

    async def attach(self, session_id: str, req: VolumeAttach, ws: str | None = None) -> None:
        srow = self.records.get(SessionRow, session_id, ws=ws)
        vrow = self.usable(req.volume_id, ws)
        if srow.state not in LIVE or not self.host.has_vm(session_id):
            raise ConflictError(f"session {session_id} is {srow.state}, not running")
        if (vrow.host_id or LOCAL) != (srow.host_id or LOCAL):
            raise ConflictError(f"volume {vrow.id} is on host {vrow.host_id or LOCAL}; session "
                                f"{session_id} runs on host {srow.host_id or LOCAL} (a volume "
                                "stays on its host)")
        await self._attach(session_id, req)

    async def _attach(self, session_id: str, req: VolumeAttach) -> None:
        path = mount_path(req.path)
        row = self.usable(req.volume_id)
        for att in self.attachments(session_id):
            if att.volume_id == row.id:
                if att.path == path and att.read_only == req.read_only:
                    return
                raise ConflictError(f"volume {row.id} is already attached to session "
                                    f"{session_id} at {att.path}")
            if att.path == path:
                raise ValidationError(f"volume {att.volume_id} is already mounted at {path} "
                                      f"in session {session_id}", field="path")
        self._check_free(row)
        try:
            # reserved before the hot-plug: of two attaches of one volume, one wins here
            await self.records.transition(VolumeRow, row.id, V.IN_USE, expected=[V.AVAILABLE],
                                          session_id=session_id, path=path,
                                          read_only=int(req.read_only))
        except IllegalTransitionError:
            self._check_free(self.row(row.id))
            raise
        try:
            await self.host.attach_volume(session_id,
                                          VolumeMountSpec(row.id, path, req.read_only))
        except BaseException:
            await self._release(row.id, session_id)
            raise
        log.info("%s: attached to %s at %s", row.id, session_id, path)

    async def detach(self, session_id: str, volume_id: str, ws: str | None = None) -> None:
        self.records.get(SessionRow, session_id, ws=ws)
        self.row(volume_id, ws)
        mount = next((m for m in self.mounts_of(session_id) if m.volume_id == volume_id), None)
        if mount is None:
            raise ConflictError(f"volume {volume_id} is not attached to session {session_id}")
        srow = self.records.get(SessionRow, session_id)
        if srow.state not in LIVE or not self.host.has_vm(session_id):
            raise ConflictError(f"session {session_id} is {srow.state}, not running")
        await self.host.detach_volume(session_id, mount)
        await self._release(volume_id, session_id)
        log.info("%s: detached from %s", volume_id, session_id)

    async def _release(self, volume_id: str, session_id: str) -> None:
        row = self.records.find(VolumeRow, volume_id)
        if row is None or row.session_id != session_id or row.state != V.IN_USE.value:
            return
        try:
            await self.records.transition(VolumeRow, volume_id, V.AVAILABLE,
                                          expected=[V.IN_USE], session_id=None, path=None,
                                          read_only=0)
        except IllegalTransitionError:
            pass

    async def release_session(self, session_id: str) -> None:
        """The session ended: its volumes are available again."""
        for row in self._attached_rows(session_id):
            log.info("%s: session %s ended; volume available again", row.id, session_id)
            await self._release(row.id, session_id)

    async def lost(self, session_id: str, volume_ids: list[str]) -> None:
        """The guest lost these volumes (a re-plug after a capture failed)."""
        for vid in volume_ids:
            await self._release(vid, session_id)

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a (re)start, once sessions are recovered: finish deletions, free the volumes of
        sessions that are not running, and remove volume files no record owns."""
        for row in self.records.all(VolumeRow):
            if row.state == V.DELETING.value:
                await self._finish_delete(row.id)
            elif row.state == V.IN_USE.value and row.session_id is not None:
                srow = self.records.find(SessionRow, row.session_id)
                if srow is not None and srow.state in PAUSE_STATES:
                    continue  # attached to a paused session: plugged in again at its resume
                if srow is None or srow.state not in LIVE \
                        or not self.host.has_vm(row.session_id):
                    await self._release(row.id, row.session_id)
        known = {r.id for r in self.records.all(VolumeRow) if r.state != V.DELETED.value}
        for vid in await self.host.volume_files():
            if vid not in known:
                log.info("removing the file of %s: no volume owns it", vid)
                await self.host.delete_volume(vid)
