"""Hosts (admin keys only): host workers register and heartbeat; operators list, drain and
remove them. The records and their rules are ``control/hosts.py``'s."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from ...models import HostHeartbeat, HostHeartbeatAnswer, HostInfo, HostRegister, HostRegistered
from ..deps import Admin, Plane
from . import errors

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])

HostId = Annotated[str, Path(max_length=64, description="the host's id")]


@router.post("", response_model=HostRegistered, operation_id="registerHost",
             responses=errors(403, 409))
async def register_host(body: HostRegister, plane: Plane, _: Admin) -> HostRegistered:
    """A host worker registers (``host_id`` null: a new host, given an id) or registers again
    (a LOST host becomes ACTIVE). The answer names the sessions it owns: it stops any other VM
    it runs."""
    return await plane.hosts.register(body)


@router.post("/{host_id}/heartbeat", response_model=HostHeartbeatAnswer,
             operation_id="hostHeartbeat", responses=errors(403))
async def heartbeat(host_id: HostId, body: HostHeartbeat, plane: Plane,
                    _: Admin) -> HostHeartbeatAnswer:
    """A host worker is alive; the answer names the sessions it owns (fencing). 404 for a host
    not registered or LOST: it registers again."""
    return await plane.hosts.heartbeat(host_id, body)


@router.get("", response_model=list[HostInfo], operation_id="listHosts", responses=errors(403))
async def list_hosts(plane: Plane, _: Admin) -> list[HostInfo]:
    """Every host: the embedded one (``local``) first, then the registered workers."""
    return plane.hosts.query()


@router.get("/{host_id}", response_model=HostInfo, operation_id="getHost",
            responses=errors(403))
async def get_host(host_id: HostId, plane: Plane, _: Admin) -> HostInfo:
    return plane.hosts.get(host_id)


@router.post("/{host_id}/drain", response_model=HostInfo, operation_id="drainHost",
             responses=errors(403, 409))
async def drain_host(host_id: HostId, plane: Plane, _: Admin) -> HostInfo:
    """No new sessions on the host; those it runs go on. Idempotent."""
    return await plane.hosts.drain(host_id)


@router.post("/{host_id}/undrain", response_model=HostInfo, operation_id="undrainHost",
             responses=errors(403, 409))
async def undrain_host(host_id: HostId, plane: Plane, _: Admin) -> HostInfo:
    """A DRAINING host takes new sessions again. Idempotent."""
    return await plane.hosts.undrain(host_id)


@router.delete("/{host_id}", status_code=204, operation_id="removeHost",
               responses=errors(403, 409))
async def remove_host(host_id: HostId, plane: Plane, _: Admin, force: Annotated[bool, Query(
        description="also when sessions are placed on it: they are terminated first "
        "(\"host removed\")")] = False) -> Response:
    """Forget a host (409 while sessions are placed on it, unless ``force``). The embedded host
    cannot be removed."""
    await plane.hosts.remove(host_id, force=force)
    return Response(status_code=204)
