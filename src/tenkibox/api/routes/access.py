"""Workspaces, API keys and the audit trail. Creating and changing them takes an admin key; a
workspace key may read its own workspace, its usage and its audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ...errors import WorkspaceNotFoundError
from ...models import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyCreated,
    AuditEntry,
    Usage,
    Workspace,
    WorkspaceCreate,
    WorkspaceUpdate,
)
from ..auth import Principal
from ..deps import Admin, Caller, Plane
from . import errors

router = APIRouter(prefix="/v1", tags=["access"])

WorkspaceFilter = Annotated[str | None, Query(
    max_length=64, description="only this workspace's (admin keys; a workspace key sees its own)")]


def _visible(caller: Principal, workspace_id: str) -> None:
    """A workspace key sees its own workspace only; any other answers like an unknown one."""
    if not caller.admin and workspace_id != caller.workspace_id:
        raise WorkspaceNotFoundError(f"workspace {workspace_id} not found")


@router.post("/workspaces", response_model=Workspace, status_code=201,
             operation_id="createWorkspace", responses=errors(403, 409))
async def create_workspace(body: WorkspaceCreate, plane: Plane, _: Admin) -> Workspace:
    return await plane.workspaces.create(body)


@router.get("/workspaces", response_model=list[Workspace], operation_id="listWorkspaces",
            responses=errors())
async def list_workspaces(plane: Plane, caller: Caller) -> list[Workspace]:
    """All of them for an admin key; the key's own for a workspace key."""
    if caller.admin:
        return plane.workspaces.query()
    return [plane.workspaces.get(caller.workspace_id)]


@router.get("/workspaces/{workspace_id}", response_model=Workspace,
            operation_id="getWorkspace", responses=errors(404))
async def get_workspace(workspace_id: str, plane: Plane, caller: Caller) -> Workspace:
    _visible(caller, workspace_id)
    return plane.workspaces.get(workspace_id)


@router.patch("/workspaces/{workspace_id}", response_model=Workspace,
              operation_id="updateWorkspace", responses=errors(403, 404, 409))
async def update_workspace(workspace_id: str, body: WorkspaceUpdate, plane: Plane,
                           _: Admin) -> Workspace:
    """Only the fields given change; in ``quotas``, only the quotas given (null removes one)."""
    return await plane.workspaces.update(workspace_id, body)


@router.delete("/workspaces/{workspace_id}", response_model=Workspace,
               operation_id="deleteWorkspace", responses=errors(403, 404, 409))
async def delete_workspace(workspace_id: str, plane: Plane, caller: Admin) -> Workspace:
    """Refused while the workspace holds sessions, snapshots or volumes (named); its keys are
    revoked with it."""
    return await plane.workspaces.delete(workspace_id, caller_workspace=caller.workspace_id)


@router.get("/workspaces/{workspace_id}/usage", response_model=Usage,
            operation_id="workspaceUsage", responses=errors(404))
async def workspace_usage(workspace_id: str, plane: Plane, caller: Caller) -> Usage:
    _visible(caller, workspace_id)
    return plane.workspaces.usage(workspace_id)


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=201,
             operation_id="createApiKey", responses=errors(403, 404))
async def create_api_key(body: ApiKeyCreate, plane: Plane, _: Admin) -> ApiKeyCreated:
    """The secret is in this answer only; the server keeps its SHA-256."""
    return await plane.keys.create(body)


@router.get("/api-keys", response_model=list[ApiKey], operation_id="listApiKeys",
            responses=errors(403))
async def list_api_keys(plane: Plane, _: Admin,
                        workspace_id: WorkspaceFilter = None) -> list[ApiKey]:
    return plane.keys.query(workspace_id)


@router.delete("/api-keys/{key_id}", response_model=ApiKey, operation_id="revokeApiKey",
               responses=errors(403, 404))
async def revoke_api_key(key_id: str, plane: Plane, _: Admin) -> ApiKey:
    """Effective on the key's next call; idempotent."""
    return await plane.keys.revoke(key_id)


@router.get("/audit", response_model=list[AuditEntry], operation_id="listAudit",
            responses=errors())
async def list_audit(plane: Plane, caller: Caller, workspace_id: WorkspaceFilter = None,
                     limit: Annotated[int, Query(
                         ge=1, le=1000, description="at most this many entries, newest first"
                     )] = 100,
                     before_id: Annotated[int | None, Query(
                         ge=1, description="only entries older than this id (the next page)"
                     )] = None) -> list[AuditEntry]:
    """Newest first. A workspace key sees its own workspace's entries; an admin key sees all
    (or one workspace's, with ``workspace_id``)."""
    if not caller.admin:
        if workspace_id is not None:
            _visible(caller, workspace_id)
        workspace_id = caller.workspace_id
    return plane.audit.query(workspace_id, limit, before_id)
