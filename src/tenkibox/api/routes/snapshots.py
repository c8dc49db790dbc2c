"""Snapshots: capture (asynchronous), read, wait, delete. A restore is ``POST /v1/sessions``
with ``snapshot_id``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ...models import Snapshot, SnapshotCreate, SnapshotUpdate
from ..deps import Caller, Plane
from . import errors

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])


@router.post("", response_model=Snapshot, status_code=202, operation_id="createSnapshot",
             responses=errors(404, 409, 429))
async def create_snapshot(body: SnapshotCreate, plane: Plane, caller: Caller) -> Snapshot:
    """Starts a capture; answers CREATING. READY once memory, device state and disk are stored
    and verified; FAILED with the reason otherwise."""
    return await plane.snapshots.create(body, caller.workspace_id)


@router.get("", response_model=list[Snapshot], operation_id="listSnapshots",
            responses=errors())
async def list_snapshots(plane: Plane, caller: Caller,
                         session_id: Annotated[str | None, Query(
                             max_length=64, description="only snapshots of this session")] = None,
                         ) -> list[Snapshot]:
    return plane.snapshots.query(caller.workspace_id, session_id)


@router.get("/{snapshot_id}", response_model=Snapshot, operation_id="getSnapshot",
            responses=errors(404))
async def get_snapshot(snapshot_id: str, plane: Plane, caller: Caller) -> Snapshot:
    return plane.snapshots.get(snapshot_id, caller.workspace_id)


@router.get("/{snapshot_id}/wait", response_model=Snapshot, operation_id="waitSnapshot",
            responses=errors(404))
async def wait_snapshot(snapshot_id: str, plane: Plane, caller: Caller,
                        timeout_s: Annotated[float, Query(
                            ge=0, le=3600, description="seconds to wait for the snapshot to leave "
                            "CREATING; answered as it is when they are up")] = 30.0) -> Snapshot:
    return await plane.snapshots.wait(snapshot_id, timeout_s, caller.workspace_id)


@router.patch("/{snapshot_id}", response_model=Snapshot, operation_id="updateSnapshot",
              responses=errors(404, 409))
async def update_snapshot(snapshot_id: str, body: SnapshotUpdate, plane: Plane,
                          caller: Caller) -> Snapshot:
    """Rename a snapshot or change its expiry (``expires_at: null`` removes it)."""
    return await plane.snapshots.update(snapshot_id, body, caller.workspace_id)


@router.delete("/{snapshot_id}", response_model=Snapshot, operation_id="deleteSnapshot",
               responses=errors(404, 409))
async def delete_snapshot(snapshot_id: str, plane: Plane, caller: Caller) -> Snapshot:
    return await plane.snapshots.delete(snapshot_id, caller.workspace_id)
