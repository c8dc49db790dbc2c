"""Volumes: durable block storage, attached explicitly (see the sessions routes)."""

from __future__ import annotations

from fastapi import APIRouter

from ...models import Volume, VolumeCreate
from ..deps import Caller, Plane
from . import errors

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])


@router.post("", response_model=Volume, status_code=201, operation_id="createVolume",
             responses=errors(429, 503))
async def create_volume(body: VolumeCreate, plane: Plane, caller: Caller) -> Volume:
    return await plane.volumes.create(body, caller.workspace_id)


@router.get("", response_model=list[Volume], operation_id="listVolumes", responses=errors())
async def list_volumes(plane: Plane, caller: Caller) -> list[Volume]:
    return plane.volumes.query(caller.workspace_id)


@router.get("/{volume_id}", response_model=Volume, operation_id="getVolume",
            responses=errors(404))
async def get_volume(volume_id: str, plane: Plane, caller: Caller) -> Volume:
    return plane.volumes.get(volume_id, caller.workspace_id)


@router.delete("/{volume_id}", response_model=Volume, operation_id="deleteVolume",
               responses=errors(404, 409))
async def delete_volume(volume_id: str, plane: Plane, caller: Caller) -> Volume:
    return await plane.volumes.delete(volume_id, caller.workspace_id)
