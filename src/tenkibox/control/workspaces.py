"""Workspaces: the records every session, snapshot, volume and key belongs to.

A workspace is created and changed by an admin; its quotas are checked by ``admission`` when
something is created in it. It can be deleted only once it holds nothing (the answer names what
it still holds); its keys are revoked with it.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from ..errors import ConflictError, PermissionDeniedError, WorkspaceNotFoundError
from ..ids import new_id
from ..models import (
    Quotas,
    SessionState,
    SnapshotState,
    SnapshotType,
    Usage,
    VolumeState,
    Workspace,
    WorkspaceCreate,
    WorkspaceUpdate,
)
from ..store.tables import ApiKeyRow, SessionRow, SnapshotRow, VolumeRow, WorkspaceRow
from .records import Records

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"

#: Sessions that hold a VM (or are about to, or are still letting it go): what the session and
#: memory quotas and the host's capacity count. A PAUSED session holds no VM (its memory is in
#: its PAUSE snapshot): it counts against none of them, and its resume is admitted again.
HOLDING_SESSION = (SessionState.CREATING.value, SessionState.READY.value,
                   SessionState.RUNNING.value, SessionState.PAUSING.value,
                   SessionState.RESUMING.value, SessionState.TERMINATING.value)
#: Sessions that still exist (a workspace holding one cannot be deleted).
EXISTING_SESSION = (*HOLDING_SESSION, SessionState.PAUSED.value)
#: Snapshots that hold stored bytes a restore can use.
HOLDING_SNAPSHOT = (SnapshotState.CREATING.value, SnapshotState.READY.value)
#: Volumes that exist.
HOLDING_VOLUME = (VolumeState.AVAILABLE.value, VolumeState.IN_USE.value,
                  VolumeState.DELETING.value)


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: WorkspaceRow) -> Workspace:
    return Workspace(id=row.id, name=row.name, quotas=Quotas(**(row.quotas or {})),
                     created_at=row.created_at, updated_at=row.updated_at)


def usage_of(orm: OrmSession, ws: str) -> dict[str, int]:
    """What ``ws`` holds now, read inside the caller's transaction."""
    sessions = orm.execute(
        select(func.count(), func.coalesce(func.sum(SessionRow.memory_mb), 0))
        .where(SessionRow.workspace_id == ws, SessionRow.state.in_(HOLDING_SESSION))).one()
    # a paused session's PAUSE snapshot is no snapshot of the user's (the count), but its bytes
    # are stored like any other's
    snapshots = orm.execute(
        select(func.count().filter(SnapshotRow.type != SnapshotType.PAUSE.value),
               func.coalesce(func.sum(SnapshotRow.compressed_bytes), 0))
        .where(SnapshotRow.workspace_id == ws, SnapshotRow.state.in_(HOLDING_SNAPSHOT))).one()
    volumes = orm.execute(
        select(func.count(), func.coalesce(func.sum(VolumeRow.size_bytes), 0))
        .where(VolumeRow.workspace_id == ws, VolumeRow.state.in_(HOLDING_VOLUME))).one()
    return {"concurrent_sessions": int(sessions[0]), "memory_mib": int(sessions[1]),
            "snapshots": int(snapshots[0]), "volumes": int(volumes[0]),
            "stored_bytes": int(snapshots[1]) + int(volumes[1])}


class WorkspaceControl:
    def __init__(self, records: Records) -> None:
        self.records = records

    # -- reads -------------------------------------------------------------------------------
    def row(self, workspace_id: str) -> WorkspaceRow:
        return self.records.get(WorkspaceRow, workspace_id)

    def get(self, workspace_id: str) -> Workspace:
        return to_model(self.row(workspace_id))

    def query(self) -> list[Workspace]:
        rows = self.records.all(WorkspaceRow)
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    def by_name(self, name: str) -> WorkspaceRow | None:
        rows = self.records.all(WorkspaceRow, WorkspaceRow.name == name)
        return rows[0] if rows else None

    def usage(self, workspace_id: str) -> Usage:
        row = self.row(workspace_id)
        with self.records.store.tx() as orm:
            used = usage_of(orm, workspace_id)
        return Usage(workspace_id=workspace_id, quotas=Quotas(**(row.quotas or {})), **used)

    # -- writes ------------------------------------------------------------------------------
    async def ensure_default(self) -> WorkspaceRow:
        """The ``default`` workspace (made by the migration; made again if it was deleted)."""
        row = self.by_name(DEFAULT_NAME)
        if row is None:
            # another control-plane process may make it at the same time: either is the one
            with contextlib.suppress(ConflictError):
                await self.create(WorkspaceCreate(name=DEFAULT_NAME))
            row = self.by_name(DEFAULT_NAME)
            assert row is not None
        return row

    async def create(self, req: WorkspaceCreate) -> Workspace:
        t = now()
        row = WorkspaceRow(id=new_id("workspace"), name=req.name,
                           quotas=req.quotas.model_dump(exclude_none=True), created_at=t,
                           updated_at=t)
        try:
            await self.records.insert(row)
        except IntegrityError as exc:
            raise ConflictError(f"a workspace named {req.name!r} exists already",
                                field="name") from exc
        log.info("%s: workspace %r created", row.id, row.name)
        return to_model(row)

    async def update(self, workspace_id: str, req: WorkspaceUpdate) -> Workspace:
        # read-modify-write of the quotas: written only if no one changed the record since it
        # was read (its updated_at), else read again (another request or control plane)
        for _ in range(20):
            row = self.row(workspace_id)
            values: dict[str, Any] = {"updated_at": now()}
            if req.name is not None:
                values["name"] = req.name
            if req.quotas is not None:
                quotas = dict(row.quotas or {})
                for name in req.quotas.model_fields_set:
                    value = getattr(req.quotas, name)
                    if value is None:
                        quotas.pop(name, None)
                    else:
                        quotas[name] = value
                values["quotas"] = quotas
            try:
                if await self.records.update(WorkspaceRow, workspace_id,
                                             when={"updated_at": row.updated_at}, **values):
                    break
            except IntegrityError as exc:
                raise ConflictError(f"a workspace named {req.name!r} exists already",
                                    field="name") from exc
        else:
            raise ConflictError(f"workspace {workspace_id} changed while being updated; retry")
        return self.get(workspace_id)

    async def delete(self, workspace_id: str, *, caller_workspace: str) -> Workspace:
        row = self.row(workspace_id)
        if workspace_id == caller_workspace:
            raise PermissionDeniedError(
                f"workspace {workspace_id} holds the key making this call; delete it with an "
                "admin key of another workspace")
        held = self._held(workspace_id)
        if held:
            raise ConflictError(f"workspace {workspace_id} still holds {held}; delete them "
                                "first", details={"held": held})
        revoked = now()
        for key in self.records.all(ApiKeyRow, ApiKeyRow.workspace_id == workspace_id):
            if key.revoked_at is None:
                await self.records.update(ApiKeyRow, key.id, revoked_at=revoked)

        def still_empty(orm: OrmSession) -> None:
            # again in the delete's transaction (under the admission lock on PostgreSQL): a
            # create that got in since the look above keeps the workspace
            held = self._held(workspace_id, orm)
            if held:
                raise ConflictError(f"workspace {workspace_id} still holds {held}; delete "
                                    "them first", details={"held": held})

        if not await self.records.remove(WorkspaceRow, workspace_id, check=still_empty):
            raise WorkspaceNotFoundError(f"workspace {workspace_id} not found")
        log.info("%s: workspace %r deleted", workspace_id, row.name)
        return to_model(row)

    def _held(self, workspace_id: str, orm: OrmSession | None = None) -> str:
        """The objects ``workspace_id`` still holds, named (a few of each kind); read in
        ``orm``'s transaction when given."""
        parts = []
        kinds: list[tuple[Any, str, tuple[str, ...]]] = [
            (SessionRow, "session", EXISTING_SESSION),
            (SnapshotRow, "snapshot", (*HOLDING_SNAPSHOT, "FAILED", "DELETING")),
            (VolumeRow, "volume", HOLDING_VOLUME)]
        for cls, kind, states in kinds:
            where = (cls.workspace_id == workspace_id, cls.state.in_(states))
            ids = [r.id for r in (self.records.all(cls, *where) if orm is None
                                  else orm.scalars(select(cls).where(*where)))]
            if ids:
                shown = ", ".join(sorted(ids)[:5]) + (f" and {len(ids) - 5} more"
                                                      if len(ids) > 5 else "")
                parts.append(f"{len(ids)} {kind}{'s' if len(ids) > 1 else ''} ({shown})")
        return "; ".join(parts)
