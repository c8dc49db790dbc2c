"""Exposed ports of a session: reachable through the server's preview proxy under a URL with
an unguessable token (``control/ports.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from ...models import PORT_MAX, PORT_MIN, PortExpose, PortExposure
from ..deps import Caller, Plane
from . import errors

router = APIRouter(prefix="/v1/sessions", tags=["ports"])

GuestPort = Annotated[int, PathParam(ge=PORT_MIN, le=PORT_MAX, description="the guest's port")]


@router.post("/{session_id}/ports", response_model=PortExposure, status_code=201,
             operation_id="exposePort", responses=errors(404, 409, 429))
async def expose_port(session_id: str, body: PortExpose, plane: Plane,
                      caller: Caller) -> PortExposure:
    """Make a port of a running session's guest reachable at ``url`` (the server's preview
    proxy; the URL's ``tenki_token`` or a key of the workspace lets requests in), until
    ``ttl_s`` or until the session stops running. 409 "inbound access is disabled" for a session
    created without inbound access; 429 past 16 ports. An exposed port is answered as it is
    (its expiry moved if ``ttl_s`` is given)."""
    return await plane.ports.expose(session_id, body.port, caller.workspace_id,
                                    ttl_s=body.ttl_s)


@router.get("/{session_id}/ports", response_model=list[PortExposure], operation_id="listPorts",
            responses=errors(404))
async def list_ports(session_id: str, plane: Plane, caller: Caller) -> list[PortExposure]:
    return plane.ports.list(session_id, caller.workspace_id)


@router.delete("/{session_id}/ports/{port}", status_code=204, operation_id="unexposePort",
               responses=errors(404))
async def unexpose_port(session_id: str, port: GuestPort, plane: Plane,
                        caller: Caller) -> Response:
    """The URL stops working at once and its live connections are cut."""
    await plane.ports.unexpose(session_id, port, caller.workspace_id)
    return Response(status_code=204)
